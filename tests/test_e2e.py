"""End to end on the trained sample models: transform chains, provenance, reproducible bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from infercomp import api, checkpoint
from infercomp.data import load_data
from tests.conftest import DIGITS_TEST, KNOWN_ACCURACY, SAMPLE, invoke

NO_LAT = "--no-latency"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_chain_records_history_with_source_hashes(runner, tmp_path: Path) -> None:
    pruned, quant = tmp_path / "pruned.safetensors", tmp_path / "pruned_int8.safetensors"
    assert invoke(runner, "prune", SAMPLE["cnn"], "-o", pruned, "--sparsity", "0.3", NO_LAT).exit_code == 0
    assert invoke(runner, "quantize", pruned, "-o", quant, NO_LAT).exit_code == 0
    ck = checkpoint.load(quant)
    assert [h["transform"] for h in ck.history] == ["prune", "quantize"]
    assert ck.history[0]["source_sha256"] == _sha(SAMPLE["cnn"])
    assert ck.history[1]["source_sha256"] == _sha(pruned)
    assert ck.history[0]["config"]["sparsity"] == 0.3
    assert ck.model == {"ref": "digits-cnn", "config": {}}
    # The written file loads back as a runnable module and still classifies digits.
    data = load_data(DIGITS_TEST)
    with torch.inference_mode():
        acc = float((api.load(quant)(data.inputs).argmax(1) == data.labels).float().mean())
    assert acc >= 0.95  # 30% magnitude pruning without fine-tuning costs ~2.5 points on this CNN


def test_same_input_and_options_give_identical_bytes(runner, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out in (a, b):
        assert invoke(runner, "quantize", SAMPLE["transformer"], "-o", out, NO_LAT).exit_code == 0
    assert _sha(a) == _sha(b)


def test_report_on_written_files_matches_direct_evaluation(runner, tmp_path: Path) -> None:
    out = tmp_path / "mlp_int8.safetensors"
    r = invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, NO_LAT)
    assert r.exit_code == 0, r.stderr
    c = api.report([SAMPLE["mlp"], out], data=DIGITS_TEST, min_time=0.05, warmup=1)
    data = load_data(DIGITS_TEST)
    with torch.inference_mode():
        direct = float((api.load(out)(data.inputs).argmax(1) == data.labels).float().mean())
    assert c.models[1].accuracy == pytest.approx(direct)
    assert c.models[1].size_bytes == out.stat().st_size
    assert c.models[1].ratios["size"] < 0.3  # int8 weights: about a quarter of fp32
    assert c.models[0].accuracy == pytest.approx(KNOWN_ACCURACY["mlp"], abs=6e-4)
