"""Checkpoint I/O: formats read, atomic deterministic writes, refusal to clobber."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.errors import CheckpointError

ALL_DTYPES = {
    "f32": torch.randn(3, 2),
    "f16": torch.randn(4).half(),
    "bf16": torch.randn(2, 2).bfloat16(),
    "f8": torch.randn(5).to(torch.float8_e4m3fn),
    "i8": torch.randint(-128, 127, (7,), dtype=torch.int8),
    "u8": torch.randint(0, 255, (3,), dtype=torch.uint8),
    "i64": torch.arange(3),
    "bool": torch.tensor([True, False]),
    "scalar": torch.tensor(1.5),
    "empty": torch.zeros(0, 4),
}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_roundtrip_every_dtype_readable_by_safetensors(tmp_path: Path) -> None:
    ck = Checkpoint(tensors=dict(ALL_DTYPES), model={"ref": "digits-mlp", "config": {"hidden": [4]}}, encodings={})
    out = checkpoint.save(ck, tmp_path / "a.safetensors")
    with safe_open(str(out), framework="pt") as f:  # the reference reader accepts our writer's files
        assert set(f.keys()) == set(ALL_DTYPES)
        assert f.metadata()["format"] == "pt"
    back = checkpoint.load(out)
    for k, v in ALL_DTYPES.items():
        assert back.tensors[k].dtype == v.dtype and back.tensors[k].shape == v.shape
        assert torch.equal(
            back.tensors[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else back.tensors[k],
            v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
        )
    assert back.model == {"ref": "digits-mlp", "config": {"hidden": [4]}}


def test_non_contiguous_tensor_is_written_in_logical_order(tmp_path: Path) -> None:
    t = torch.arange(12.0).reshape(3, 4).t()  # (4, 3) view, not contiguous
    out = checkpoint.save(Checkpoint(tensors={"t": t}), tmp_path / "t.safetensors")
    assert torch.equal(checkpoint.load(out).tensors["t"], t)


def test_same_input_gives_byte_identical_file(tmp_path: Path) -> None:
    meta = {"ref": "x", "config": {"b": 1, "a": 2}}
    hist = [{"transform": "prune", "config": {"z": 1, "a": 0}, "source_sha256": "0" * 64, "infercomp_version": "0"}]
    a = checkpoint.save(Checkpoint(tensors=dict(ALL_DTYPES), model=meta, history=hist), tmp_path / "a.safetensors")
    b = checkpoint.save(Checkpoint(tensors=dict(reversed(list(ALL_DTYPES.items()))), model=meta, history=hist), tmp_path / "b.safetensors")
    assert _sha(a) == _sha(b)


def test_metadata_describes_the_file(tmp_path: Path) -> None:
    ck = Checkpoint(
        tensors={"w": torch.ones(2)}, model={"ref": "digits-cnn", "config": {}}, history=[{"transform": "quantize"}], encodings={}
    )
    out = checkpoint.save(ck, tmp_path / "m.safetensors")
    with safe_open(str(out), framework="pt") as f:
        info = json.loads(f.metadata()["infercomp"])
    assert info["format_version"] == 1  # nothing newer in it: older readers can read it
    assert info["model"]["ref"] == "digits-cnn" and info["history"][0]["transform"] == "quantize"
    assert "time" not in json.dumps(info)  # no wall-clock time: reproducible bytes


def test_refuses_to_overwrite_input(tmp_path: Path) -> None:
    src = checkpoint.save(Checkpoint(tensors={"w": torch.ones(2)}), tmp_path / "in.safetensors")
    before = _sha(src)
    with pytest.raises(CheckpointError, match="output is the input"):
        checkpoint.save(Checkpoint(tensors={"w": torch.zeros(2)}), src, force=True, source=src)
    assert _sha(src) == before


def test_refuses_existing_output_without_force(tmp_path: Path) -> None:
    out = checkpoint.save(Checkpoint(tensors={"w": torch.ones(2)}), tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError, match="--force"):
        checkpoint.save(Checkpoint(tensors={"w": torch.zeros(2)}), out)
    checkpoint.save(Checkpoint(tensors={"w": torch.zeros(2)}), out, force=True)
    assert torch.equal(checkpoint.load(out).tensors["w"], torch.zeros(2))


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.safetensors"

    def boom(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(Checkpoint(tensors={"w": torch.ones(1000)}), out)
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = checkpoint.save(Checkpoint(tensors={"w": torch.ones(3)}), tmp_path / "o.safetensors")
    before = _sha(out)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(Checkpoint(tensors={"w": torch.zeros(3)}), out, force=True)
    assert _sha(out) == before and os.listdir(tmp_path) == ["o.safetensors"]


def test_reads_weights_only_torch_files_and_wrappers(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(2, 2), "a.bias": torch.randn(2)}
    for suffix, obj in ((".pt", sd), (".pth", {"state_dict": sd}), (".bin", {"model": sd})):
        p = tmp_path / f"m{suffix}"
        torch.save(obj, p)
        back = checkpoint.load(p)
        assert set(back.tensors) == set(sd) and torch.equal(back.tensors["a.weight"], sd["a.weight"])
        assert back.model is None


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, p)
    with pytest.raises(CheckpointError, match="weights-only"):
        checkpoint.load(p)


class _Plain:  # any class torch's weights-only reader does not allow
    pass


def test_refusal_of_an_unknown_class_is_one_plain_line(tmp_path: Path) -> None:
    """torch's own message embeds terminal bold codes; ours is plain text, a pipe or a log gets no escapes."""
    p = tmp_path / "custom.pt"
    torch.save({"x": _Plain()}, p)
    with pytest.raises(CheckpointError, match="weights-only") as e:
        checkpoint.load(p)
    assert "\x1b" not in str(e.value) and len(str(e.value).splitlines()) == 1


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(1), "step": 3}, p)
    with pytest.raises(CheckpointError, match="'step' is not a tensor"):
        checkpoint.load(p)


def test_sharded_directory_with_index(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    ck = checkpoint.load(d)
    assert set(ck.tensors) == {"a", "b"}
    assert ck.model["ref"] == "hf-auto" and ck.size_bytes == sum(f.stat().st_size for f in d.glob("*.safetensors"))


def test_missing_shard_is_named(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        checkpoint.load(d)


def test_truncated_safetensors(tmp_path: Path) -> None:
    full = checkpoint.save(Checkpoint(tensors={"w": torch.randn(100)}), tmp_path / "full.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a valid safetensors file"):
        checkpoint.load(cut)


@pytest.mark.parametrize("content", [b"hello world, not a model", b"", b"\x00" * 3])
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "junk.dat"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.dat: not a checkpoint"):
        checkpoint.load(p)


def test_missing_file() -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load("/nonexistent/model.safetensors")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "future.safetensors"
    save_file({"w": torch.ones(1)}, str(p), metadata={"format": "pt", "infercomp": json.dumps({"format_version": 99})})
    with pytest.raises(CheckpointError, match="newer infercomp"):
        checkpoint.load(p)


def test_sha256_of_file_and_directory(tmp_path: Path) -> None:
    f = checkpoint.save(Checkpoint(tensors={"w": torch.ones(2)}), tmp_path / "d" / "a.safetensors")
    assert checkpoint.sha256(f) == _sha(f)
    h1 = checkpoint.sha256(f.parent)
    (f.parent / "b.safetensors").write_bytes(f.read_bytes())
    assert checkpoint.sha256(f.parent) != h1


@pytest.mark.parametrize("info", ['{"format_version": "2"}', "[1, 2]"])
def test_malformed_metadata_is_refused(tmp_path: Path, info: str) -> None:
    p = tmp_path / "odd.safetensors"
    save_file({"w": torch.ones(1)}, str(p), metadata={"format": "pt", "infercomp": info})
    with pytest.raises(CheckpointError, match="malformed"):
        checkpoint.load(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_check_finite_finds_every_nan_and_inf_and_passes_sums_that_overflow(dtype: torch.dtype) -> None:
    big = {torch.float16: 6e4, torch.float8_e4m3fn: 448.0}.get(dtype, 3e38)
    finite = torch.full((1000,), big).to(dtype)  # every value finite, their float32 sum is not (except fp8)
    checkpoint.check_finite(Checkpoint(tensors={"w": finite, "ids": torch.arange(3)}))
    for bad in (float("nan"), float("inf"), float("-inf")):
        if dtype == torch.float8_e4m3fn and bad == bad:
            continue  # e4m3fn has NaN but no infinity (torch saturates inf to 448)
        t = torch.zeros(1000, dtype=torch.float32)
        t[[3, 700]] = bad
        with pytest.raises(CheckpointError, match="'w' holds 2 NaN or infinite"):
            checkpoint.check_finite(Checkpoint(tensors={"a": finite, "w": t.to(dtype)}))


def test_lazy_tensors_are_private_maps_of_the_file(tmp_path: Path) -> None:
    """Read lazily, a tensor is a copy-on-write map of its bytes: equal to the eager read, writable
    without changing the file; bytes not aligned for their dtype are read instead of mapped; a
    file cut short after its header was read is a CheckpointError, not a crash on access."""
    p = tmp_path / "m.safetensors"
    # Ours writes tensors by name: 3 bytes first, so the float32 tensor after them starts at an odd offset.
    checkpoint.save(Checkpoint(tensors={"a": torch.arange(3, dtype=torch.uint8), "b": torch.arange(6.0).reshape(2, 3)}), p)
    assert checkpoint._header(p)[0]["b"].offset % 4 == 3
    save_file({"w": torch.randn(64, 32), "v": torch.randn(5).to(torch.bfloat16)}, str(tmp_path / "aligned.safetensors"))
    for path in (p, tmp_path / "aligned.safetensors"):
        before = path.read_bytes()
        lazy, eager = checkpoint.load(path, lazy=True), checkpoint.load(path)
        for name in eager.tensors:
            t = lazy.tensors[name]
            assert torch.equal(t, eager.tensors[name]) and t.dtype == eager.tensors[name].dtype
            t.zero_() if t.dtype != torch.bool else None  # a private copy: the file keeps its bytes
        assert path.read_bytes() == before
    lazy = checkpoint.load(tmp_path / "aligned.safetensors", lazy=True)
    with open(tmp_path / "aligned.safetensors", "r+b") as f:
        f.truncate(200)
    with pytest.raises(CheckpointError, match="truncated while reading tensor"):
        lazy.tensors["w"]
