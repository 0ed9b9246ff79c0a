"""pipeline.py: load -> transform -> save -> compare, the TRANSFORMS table, provenance, and the
output checks that run before any work."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from infercomp import checkpoint, pipeline
from infercomp.checkpoint import Checkpoint
from infercomp.distill import DistillConfig, distill
from infercomp.errors import CheckpointError
from infercomp.export import ExportConfig, export
from infercomp.measure import MeasureOptions
from infercomp.models import ModelLoader
from infercomp.prune import PruneConfig, prune
from infercomp.quantize import QuantizeConfig, quantize
from infercomp.transform import Context
from infercomp.version import __version__
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, SAMPLE

NO_LAT = MeasureOptions(latency=False)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class _Recorder:
    """A transform that records what it was given and halves every weight."""

    def __init__(self, drop_model: bool = False) -> None:
        self.calls: list[tuple[Checkpoint, object, Context]] = []
        self.drop_model = drop_model

    def __call__(self, ckpt: Checkpoint, config: object, ctx: Context) -> Checkpoint:
        self.calls.append((ckpt, config, ctx))
        return Checkpoint(tensors={k: v / 2 for k, v in ckpt.tensors.items()}, model=None if self.drop_model else ckpt.model)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setitem(pipeline.TRANSFORMS, PruneConfig, rec)
    return rec


def test_transforms_dispatch_on_the_config_type() -> None:
    assert pipeline.TRANSFORMS == {PruneConfig: prune, QuantizeConfig: quantize, DistillConfig: distill, ExportConfig: export}


def test_run_writes_what_the_transform_returned_with_its_history(recorder: _Recorder, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    cfg = PruneConfig(sparsity=0.3)
    cmp = pipeline.run(SAMPLE["mlp"], out, cfg, loader=ModelLoader(), options=NO_LAT, data=DIGITS_TRAIN, eval_data=DIGITS_TEST)
    ((given, config, ctx),) = recorder.calls
    assert given.path == SAMPLE["mlp"] and config is cfg
    assert ctx.data is not None and ctx.data.path == DIGITS_TRAIN and ctx.source == SAMPLE["mlp"] and ctx.output == out
    written = checkpoint.load(out)
    src = checkpoint.load(SAMPLE["mlp"])
    assert written.tensors.keys() == src.tensors.keys()
    assert all(torch.equal(written.tensors[k], src.tensors[k] / 2) for k in src.tensors)
    assert written.history == [
        {"transform": "prune", "config": cfg.to_dict(), "source_sha256": _sha(SAMPLE["mlp"]), "infercomp_version": __version__}
    ]
    # The comparison measures the file as written (read back from disk), on --eval-data.
    base, new = cmp.models
    assert new.path == str(out) and new.size_bytes == out.stat().st_size and new.history == ["prune"]
    assert cmp.settings["data"] == str(DIGITS_TEST)
    assert new.accuracy is not None and new.fidelity is not None and new.latency_ms is None


def test_a_chain_appends_to_the_history(tmp_path: Path) -> None:
    first, second = tmp_path / "p.safetensors", tmp_path / "q.safetensors"
    pipeline.run(SAMPLE["mlp"], first, PruneConfig(sparsity=0.5), loader=ModelLoader(), options=NO_LAT, measure=False)
    pipeline.run(first, second, QuantizeConfig(scheme="int8"), loader=ModelLoader(), options=NO_LAT, measure=False)
    h = checkpoint.load(second).history
    assert [e["transform"] for e in h] == ["prune", "quantize"]
    assert h[0]["source_sha256"] == _sha(SAMPLE["mlp"]) and h[1]["source_sha256"] == _sha(first)
    assert h[1]["config"] == QuantizeConfig(scheme="int8").to_dict()


def test_measure_false_runs_no_model(recorder: _Recorder, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    cmp = pipeline.run(SAMPLE["mlp"], out, PruneConfig(), loader=ModelLoader(), options=NO_LAT, data=DIGITS_TEST, measure=False)
    new = cmp.models[1]
    assert new.size_bytes == out.stat().st_size and new.parameters == cmp.models[0].parameters
    assert new.accuracy is None and new.fidelity is None and new.latency_ms is None


def test_the_model_reference_is_kept_when_a_transform_drops_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(pipeline.TRANSFORMS, PruneConfig, _Recorder(drop_model=True))
    out = tmp_path / "o.safetensors"
    pipeline.run(SAMPLE["cnn"], out, PruneConfig(), loader=ModelLoader(), options=NO_LAT, measure=False)
    assert checkpoint.load(out).model == checkpoint.load(SAMPLE["cnn"]).model == {"ref": "digits-cnn", "config": {}}


def test_on_saved_runs_once_the_output_is_written(recorder: _Recorder, tmp_path: Path) -> None:
    out, seen = tmp_path / "o.safetensors", []
    pipeline.run(SAMPLE["mlp"], out, PruneConfig(), loader=ModelLoader(), options=NO_LAT, measure=False,
                 on_saved=lambda p: seen.append((p, p.exists())))  # fmt: skip
    assert seen == [(out, True)]


def test_outputs_that_would_clobber_are_refused_before_the_transform_runs(recorder: _Recorder, tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    shutil.copy(SAMPLE["mlp"], src)
    data = tmp_path / "d.safetensors"
    shutil.copy(DIGITS_TEST, data)
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"precious")
    digests = {p: _sha(p) for p in (src, data, existing)}
    cases = [
        (src, {"force": True}, "output is the input file"),
        (data, {"force": True, "data": data}, "output is also an input of this run"),
        (existing, {}, "already exists; pass --force"),
    ]
    for out, kw, message in cases:
        with pytest.raises(CheckpointError, match=message):
            pipeline.run(src, out, PruneConfig(), loader=ModelLoader(), options=NO_LAT, **kw)
    assert recorder.calls == [] and {p: _sha(p) for p in digests} == digests
