"""Property: whatever bytes a checkpoint or data file holds, reading and reporting it ends in a
result or one InfercompError (exit 2), never another exception, and leaves no file behind.

Mutations of a valid quantized checkpoint: flipped / overwritten bytes anywhere (header length,
JSON header, metadata, tensor data), truncation, and edits of the ``infercomp`` metadata JSON.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import infercomp
from infercomp.errors import InfercompError
from tests.conftest import SAMPLE

SETTINGS = settings(
    max_examples=int(__import__("os").environ.get("MUTATION_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class Valid(bytes):
    """A valid int4 checkpoint's bytes (short repr: hypothesis prints failing examples)."""

    def __repr__(self) -> str:
        return f"<valid checkpoint, {len(self)} bytes>"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("valid") / "q.safetensors"
    infercomp.quantize(SAMPLE["mlp"], out, scheme="int4", measure=False)
    return Valid(out.read_bytes())


def _survives(path: Path) -> None:
    """Load and report ``path``: a result or an InfercompError, nothing else."""
    try:
        infercomp.report([path], latency=False)
        infercomp.load(path, compute="fp32")
    except InfercompError:
        pass


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=8))
def test_byte_edits(tmp_path: Path, valid: bytes, edits: list[tuple[int, int]]) -> None:
    raw = bytearray(valid)
    n = struct.unpack("<Q", raw[:8])[0]
    for pos, value in edits:
        # Half the edits land in the first 8 + header bytes, where the structure is.
        raw[pos % (8 + n) if pos % 2 else pos % len(raw)] = value
    p = tmp_path / "m.safetensors"
    p.write_bytes(bytes(raw))
    _survives(p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.safetensors"]


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=4000))
def test_truncation(tmp_path: Path, valid: bytes, cut: int) -> None:
    p = tmp_path / "m.safetensors"
    p.write_bytes(valid[: max(0, len(valid) - 1 - cut)])
    _survives(p)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@SETTINGS
@given(key=st.sampled_from(["model", "history", "encodings", "plan", "format_version"]), value=JSON, entry=st.booleans())
def test_metadata_edits(tmp_path: Path, valid: bytes, key: str, value: object, entry: bool) -> None:
    """Replace one field of the metadata (or one encoding's spec) with arbitrary JSON."""
    n = struct.unpack("<Q", valid[:8])[0]
    header = json.loads(valid[8 : 8 + n])
    info = json.loads(header["__metadata__"]["infercomp"])
    if entry and key == "encodings" and info["encodings"]:
        first = sorted(info["encodings"])[0]
        info["encodings"][first] = value
    else:
        info[key] = value
    src = tmp_path / "valid.safetensors"
    src.write_bytes(valid)
    tensors = load_file(str(src))
    src.unlink()
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt", "infercomp": json.dumps(info)})
    _survives(p)


@SETTINGS
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=5), labels=st.booleans(), dtype=st.sampled_from([torch.float32, torch.int64]))
def test_data_files(tmp_path: Path, shape: list[int], labels: bool, dtype: torch.dtype) -> None:
    """Data of any shape and dtype: accuracy, a DataError, nothing else."""
    x = torch.zeros(shape, dtype=dtype)
    tensors = {"inputs": x}
    if labels and x.dim() > 0:
        tensors["labels"] = torch.zeros(x.shape[0], dtype=torch.long)
    p = tmp_path / "d.safetensors"
    save_file(tensors, str(p))
    try:
        infercomp.report([SAMPLE["mlp"]], data=p, latency=False)
    except InfercompError:
        pass


@SETTINGS
@given(
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=0, max_size=4),
    cut=st.integers(min_value=0, max_value=40000) | st.none(),
)
def test_lazy_header_checks_agree_with_the_safetensors_library(
    tmp_path: Path, valid: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    """A lazy read parses the header itself (safe_open would map the whole file): it must accept
    exactly the files the safetensors library accepts, header edits and truncations alike."""
    from safetensors import safe_open

    from infercomp import checkpoint

    raw = bytearray(valid)
    n = struct.unpack("<Q", raw[:8])[0]
    for pos, value in edits:
        raw[pos % (8 + n)] = value  # the header's length or its JSON
    if cut is not None:
        raw = raw[: max(0, len(raw) - 1 - cut)]
    p = tmp_path / "m.safetensors"
    p.write_bytes(bytes(raw))
    try:
        with safe_open(str(p), framework="pt") as f:
            library = sorted(f.keys()), f.metadata()
    except Exception:  # noqa: BLE001 (whatever the library raises: it refused the file)
        library = None
    try:
        entries, meta = checkpoint._header(p)  # what checkpoint.load(p, lazy=True) reads
        ours = sorted(entries), meta
    except InfercompError:
        ours = None
    assert (library is None) == (ours is None), (library is None, bytes(raw[8 : 8 + n]))
    assert ours == library
