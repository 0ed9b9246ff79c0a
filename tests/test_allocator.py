"""The allocator settings for running models (infercomp.allocator): freed activations stay in the
heap between calls, unless the user chose the allocator's settings."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import infercomp.allocator as allocator
from infercomp.kernels import KernelCache
from tests.conftest import DIGITS_TEST, SAMPLE, run_cli

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A block made, written and freed, 8 times. 40 MB (a (B, T, vocab) logits tensor, say) is above
# glibc's largest own mmap threshold (32 MB): it gets a mapping of its own, unmapped at the free,
# so each round faults its pages in again; set for models (threshold 64 MB) it comes from the
# heap, which keeps it. 8 MB shows the streaming mode: glibc's defaults serve it from the heap
# after the first round, streaming maps and unmaps it each time. Huge pages are turned off for
# the process, so that a fault is one page.
_FAULTS = """
import ctypes, json, resource, sys, torch
import infercomp.allocator as allocator
if ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) != 0:  # PR_SET_THP_DISABLE
    print(json.dumps({"skip": "prctl(PR_SET_THP_DISABLE) refused"}))
    sys.exit(0)
torch.set_num_threads(1)
for mode in filter(None, sys.argv[1].split(",")):
    getattr(allocator, "for_" + mode)()
numel = int(sys.argv[2]) // 4
def burst():
    x = torch.empty(numel).fill_(1.0)
    del x
for _ in range(4):
    burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    burst()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"rounds_faulted": faults / (int(sys.argv[2]) / resource.getpagesize()), "state": allocator.state()}))
"""
BIG, MID = 40 << 20, 8 << 20


def _run(modes: str, size: int = BIG, **env: str) -> dict:
    """The child above after ``allocator.for_<mode>()`` for each of ``modes`` (comma-separated):
    how many of its 8 rounds faulted the whole block in (about 8 or about 0), and the state."""
    drop = ("GLIBC_TUNABLES", "INFERCOMP_MALLOC", "LD_PRELOAD")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in drop}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, modes, str(size)], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(got["skip"])
    return got


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_models_mode_keeps_freed_activations():
    plain, tuned = _run(""), _run("models")
    assert plain["state"] == "glibc's default"
    assert tuned["state"].startswith("glibc, thresholds raised by infercomp")
    assert plain["rounds_faulted"] >= 7.5  # glibc's defaults give the 40 MB back at each free
    assert tuned["rounds_faulted"] < 0.5


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_streaming_mode_gives_freed_blocks_back():
    assert _run("", MID)["rounds_faulted"] < 0.5  # glibc's defaults keep 8 MB blocks in the heap
    streaming = _run("streaming", MID)
    assert streaming["state"].startswith("glibc, set by infercomp for streaming")
    assert streaming["rounds_faulted"] >= 7.5


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_each_mode_is_set_again_when_the_process_changes_what_it_does():
    """A recipe streams one step and measures the next, in one process: each mode must hold
    after the other, and the state must say which."""
    back = _run("models,streaming", MID)
    assert back["state"].startswith("glibc, set by infercomp for streaming") and back["rounds_faulted"] >= 7.5
    again = _run("streaming,models,streaming,models")
    assert again["state"].startswith("glibc, thresholds raised by infercomp") and again["rounds_faulted"] < 0.5


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_user_settings_are_left_alone():
    opted_out = _run("models", INFERCOMP_MALLOC="default")
    assert opted_out["state"] == "left as it is (INFERCOMP_MALLOC=default)"
    assert opted_out["rounds_faulted"] >= 7.5
    assert _run("streaming", MID, INFERCOMP_MALLOC="default")["rounds_faulted"] < 0.5
    own = _run("models", MALLOC_TRIM_THRESHOLD_="1000000000")
    assert own["state"] == "glibc, as set in the environment (MALLOC_TRIM_THRESHOLD_)"
    tunables = _run("models", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000000")
    assert tunables["state"] == "glibc, as set in the environment (GLIBC_TUNABLES)"
    # tunables of something other than malloc are not a choice of its settings
    other = _run("models", GLIBC_TUNABLES="glibc.pthread.rseq=0")
    assert other["state"].startswith("glibc, thresholds raised by infercomp") and other["rounds_faulted"] < 0.5


def test_other_allocator_in_ld_preload_is_named(monkeypatch):
    monkeypatch.delenv("INFERCOMP_MALLOC", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator._untouched() == "jemalloc (LD_PRELOAD)"


def test_kernel_choices_are_cached_per_allocator(monkeypatch):
    monkeypatch.setattr(allocator, "_state", "glibc's default")
    before = KernelCache.context()
    monkeypatch.setattr(allocator, "_state", "jemalloc (LD_PRELOAD)")
    assert KernelCache.context() != before
    assert KernelCache.context().endswith("|jemalloc (LD_PRELOAD)")


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"INFERCOMP_MALLOC": "", "LD_PRELOAD": ""}, "glibc, thresholds raised by infercomp"),
        ({"INFERCOMP_MALLOC": "default"}, "left as it is"),
    ],
)
def test_report_says_which_allocator_ran_the_models(env: dict[str, str], expected: str):
    r = run_cli("report", str(SAMPLE["mlp"]), "--data", str(DIGITS_TEST), "--no-latency", "-f", "json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["allocator"].startswith(expected)


def test_no_allocator_named_when_no_model_ran(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(plain))  # tensors only: no model code to build and run
    r = run_cli("report", str(plain), "-f", "json")
    assert r.returncode == 0, r.stderr
    assert "allocator" not in json.loads(r.stdout)["settings"]
