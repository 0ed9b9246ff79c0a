"""The Python verbs: the same options as the CLI flags, the same Comparison back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import infercomp
from infercomp import checkpoint
from infercomp.errors import UsageError
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, SAMPLE


def test_quantize_without_measuring_writes_and_returns_static_figures(tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    r = infercomp.quantize(SAMPLE["mlp"], out, scheme="int4", measure=False)
    assert out.exists() and checkpoint.load(out).encodings
    base, new = r.models
    assert new.path == str(out) and new.ratios["size"] < 0.3
    assert base.latency_ms is None and new.latency_ms is None and new.accuracy is None  # nothing was run
    assert r.to_dict()["schema"] == "infercomp.report/1"


def test_prune_measures_accuracy_with_data(tmp_path: Path) -> None:
    r = infercomp.prune(
        SAMPLE["cnn"], tmp_path / "p.safetensors", method="channel", sparsity=0.5, data=DIGITS_TEST, latency=False, threads=1
    )
    base, new = r.models
    assert base.accuracy is not None and new.accuracy is not None and new.parameters < 0.4 * base.parameters
    assert r.settings["threads"] == 1


def test_report_and_load(tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    infercomp.quantize(SAMPLE["mlp"], out, scheme="int8", measure=False)
    r = infercomp.report([SAMPLE["mlp"], out], data=DIGITS_TEST, min_time=0.02, warmup=1)
    assert [m.path for m in r.models] == [str(SAMPLE["mlp"]), str(out)]
    assert r.models[1].latency_ms is not None and r.models[1].fidelity["cosine_mean"] > 0.999
    model = infercomp.load(out)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_distill_verb_trains_a_student(tmp_path: Path) -> None:
    r = infercomp.distill(
        SAMPLE["mlp"],
        tmp_path / "s.safetensors",
        data=DIGITS_TRAIN,
        val_data=DIGITS_TEST,
        student_model="digits-mlp",
        student_config={"hidden": [32]},
        epochs=2,
        measure=False,
    )
    assert r is not None and r.models[1].parameters < r.models[0].parameters
    assert not (tmp_path / "s.train-state.safetensors").exists()  # written: nothing left to resume


def test_unknown_options_are_named() -> None:
    with pytest.raises(UsageError, match="unknown option.*thread\\b"):
        infercomp.report([SAMPLE["mlp"]], thread=2)
    with pytest.raises(UsageError, match="--scheme 'int3'"):
        infercomp.quantize(SAMPLE["mlp"], "never-written.safetensors", scheme="int3")
    assert not Path("never-written.safetensors").exists()
