"""formats/__init__.py: the one registry FORMATS and the logical view of a checkpoint's tensors."""

from __future__ import annotations

import pytest
import torch

import infercomp.formats as formats
from infercomp.errors import CheckpointError
from infercomp.formats import FORMATS
from infercomp.formats.sparse import BITMASK


def _mixed() -> tuple[dict[str, torch.Tensor], dict]:
    """A plain bias, a bitmask-encoded weight and an fp8-encoded weight."""
    w = torch.zeros(4, 16)
    w[:, 0] = 1.5
    sparse, sparse_spec = BITMASK.encode("a.weight", w)
    fp8, fp8_spec = FORMATS["fp8"].encode("b.weight", torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    return {**sparse, **fp8, "a.bias": torch.ones(4)}, {"a.weight": sparse_spec, "b.weight": fp8_spec}


def test_registry_holds_every_codec() -> None:
    assert set(FORMATS) == {"int8", "int8-dynamic", "int4", "fp8", "pack-quantized", "sparse-bitmask", "sparse-24-bitmask"}
    assert all(fmt.name == codec for codec, fmt in FORMATS.items())


def test_logical_view_decodes_encoded_tensors_and_keeps_plain_ones() -> None:
    tensors, encs = _mixed()
    dense = formats.logical_tensors(tensors, encs)
    assert set(dense) == {"a.weight", "a.bias", "b.weight"}
    assert torch.equal(dense["a.weight"][:, 0], torch.full((4,), 1.5)) and int(torch.count_nonzero(dense["a.weight"])) == 4
    assert formats.logical_shapes(tensors, encs) == {"a.weight": (4, 16), "a.bias": (4,), "b.weight": (8, 16)}
    assert formats.stored_keys(encs) == {
        "a.weight": ["a.weight.bitmask", "a.weight.compressed"],
        "b.weight": ["b.weight", "b.weight_scale"],
    }
    nbytes = formats.stored_bytes(tensors, encs)
    assert nbytes["a.weight"] == 4 * 2 + 4 * 4 and nbytes["b.weight"] == 8 * 16 + 8 * 4 and nbytes["a.bias"] == 16


def test_stored_form_keeps_untouched_tensors_encoded() -> None:
    tensors, encs = _mixed()
    kept, kept_encs = formats.stored_form(tensors, encs, drop={"a.weight"})
    assert set(kept) == {"a.bias", "b.weight", "b.weight_scale"} and set(kept_encs) == {"b.weight"}
    assert kept["b.weight"] is tensors["b.weight"]


def test_unknown_codec_and_missing_parts_are_named() -> None:
    tensors, encs = _mixed()
    with pytest.raises(CheckpointError, match=r"m.safetensors: tensor 'a.weight' uses unknown encoding 'int3'; upgrade infercomp"):
        formats.logical_tensors(tensors, {**encs, "a.weight": {**encs["a.weight"], "codec": "int3"}}, "m.safetensors")
    del tensors["b.weight_scale"]
    with pytest.raises(CheckpointError, match=r"encoded tensor 'b.weight' lacks stored tensor 'b.weight_scale'"):
        formats.logical_tensors(tensors, encs)
