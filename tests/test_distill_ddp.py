"""infercomp distill under torchrun: 2 CPU processes (gloo) give the single-process result.

The per-rank batch is half the single run's batch, so the global batch (and with it every
gradient step) is the same; each rank's loss is its sum over the global batch size, times the world
size, so even the uneven last batch matches. What differs is only the order of float additions in
the gradient all-reduce: the stated tolerance is 1e-5 absolute on every weight (measured: ~5e-8)
for a model without BatchNorm (BatchNorm statistics are per rank: see docs/distill.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infercomp import checkpoint
from infercomp.distill import state_path
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, SAMPLE, run_cli

TOLERANCE = 1e-5


@pytest.mark.slow  # two torchrun workers plus a single run: 12-16 s
def test_two_cpu_processes_match_one(tmp_path: Path) -> None:
    common = ["distill", SAMPLE["mlp"], "--data", DIGITS_TRAIN, "--val-data", DIGITS_TEST, "--student-model", "digits-mlp",
              "--student-config", '{"hidden": [32]}', "--epochs", "2", "--no-latency", "-f", "json", "--seed", "3"]  # fmt: skip
    single, multi = tmp_path / "single.safetensors", tmp_path / "ddp.safetensors"
    p = run_cli(*common, "-o", single, "--batch-size", "64")
    assert p.returncode == 0, p.stderr
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "infercomp",
           *map(str, common), "-o", str(multi), "--batch-size", "32"]  # fmt: skip
    q = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert q.returncode == 0, q.stderr[-3000:]
    # Rank 0 alone prints and writes: one report, one set of epoch lines, no state left.
    assert q.stdout.count('"schema"') == 1
    assert q.stderr.count("epoch 2/2") == 1
    assert sorted(os.listdir(tmp_path)) == ["ddp.safetensors", "single.safetensors"]
    assert not state_path(multi).exists()
    a, b = checkpoint.load(single), checkpoint.load(multi)
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        diff = float((a.tensors[name] - b.tensors[name]).abs().max())
        assert diff <= TOLERANCE, f"{name}: max |single - ddp| = {diff}"
    ca, cb = a.history[-1]["config"], b.history[-1]["config"]
    assert (ca.pop("batch_size"), cb.pop("batch_size")) == (64, 32) and ca == cb  # --batch-size is per rank
