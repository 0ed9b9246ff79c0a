"""formats/quantized.py: int8, int8-dynamic, int4 and fp8 through the registry: encode / decode
round trips, the stored keys, the format version a spec needs, and which module runs a layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import infercomp.formats.grid as grid
import infercomp.formats.qmodules as qmodules
from infercomp.errors import InfercompError
from infercomp.formats import FORMATS, format_version
from infercomp.formats.grid import IntFormat
from infercomp.metrics import sqnr
from tests.conftest import outlier_columns

INT_BITS = {"int8": 8, "int8-dynamic": 8, "int4": 4}


def _encode(codec: str, w: torch.Tensor, *, group_size: int | None = None, symmetric: bool = True, columns: bool = False):
    """(stored, spec, the values the encoder was given, decoded) for ``w`` under ``codec``."""
    fmt = FORMATS[codec]
    if codec == "fp8":
        q, s = grid.quantize_fp8(w)
        stored, spec = fmt.encode("m.weight", w)
        return stored, spec, grid.dequantize_fp8(q, s).reshape(w.shape)
    cs = grid.column_scales(w) if columns else None
    qz = grid.quantize_rtn(w, IntFormat(INT_BITS[codec], symmetric), group_size, cs)
    stored, spec = fmt.encode("m.weight", qz, shape=w.shape, dtype=w.dtype, group_size=group_size, method="gptq")
    expected = grid.dequantize(qz.q, qz.scale, qz.zero_point, column_scale=qz.column_scale).reshape(w.shape).to(w.dtype)
    return stored, spec, expected


CASES = [
    ("int8", None, True, False, {"m.weight", "m.weight_scale"}),
    ("int8", 32, True, True, {"m.weight", "m.weight_scale", "m.weight_column_scale"}),
    ("int8-dynamic", None, True, False, {"m.weight", "m.weight_scale"}),
    ("int4", 32, True, False, {"m.weight_packed", "m.weight_scale"}),
    ("int4", 64, False, True, {"m.weight_packed", "m.weight_scale", "m.weight_zero_point", "m.weight_column_scale"}),
    ("fp8", None, True, False, {"m.weight", "m.weight_scale"}),
]


@pytest.mark.parametrize(("codec", "group_size", "symmetric", "columns", "keys"), CASES)
@pytest.mark.parametrize("shape", [(48, 128), (16, 16, 2, 2)])
def test_encode_decode_round_trip_and_keys(
    codec: str, group_size: int | None, symmetric: bool, columns: bool, keys: set[str], shape: tuple[int, ...]
) -> None:
    """What is written decodes to exactly the values the quantizer chose (logical shape and dtype),
    and the format names exactly the stored tensors it wrote."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    stored, spec, expected = _encode(codec, w, group_size=group_size, symmetric=symmetric, columns=columns)
    fmt = FORMATS[codec]
    assert set(stored) == keys and set(fmt.keys("m.weight", spec)) == keys
    assert spec["codec"] == codec and spec["shape"] == list(shape) and spec["dtype"] == "float32"
    back = fmt.decode(stored, "m.weight", spec)
    assert back.shape == w.shape and back.dtype == w.dtype and torch.equal(back, expected)
    assert sqnr(w, back) > (15 if codec == "int4" else 25)
    if codec != "fp8":
        assert spec["bits"] == INT_BITS[codec] and spec["symmetric"] == symmetric and spec["method"] == "gptq"
        assert spec["granularity"] == ("channel" if group_size is None else "group") and spec["group_size"] == group_size


def test_int4_stores_two_values_per_byte() -> None:
    stored, _, _ = _encode("int4", torch.randn(48, 128), group_size=32)
    assert stored["m.weight_packed"].dtype == torch.uint8 and stored["m.weight_packed"].shape == (48, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("codec", ["int8", "int4", "fp8"])
def test_decode_gives_the_logical_dtype(codec: str, dtype: torch.dtype) -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    stored, spec, _ = _encode(codec, w, group_size=32 if codec == "int4" else None)
    back = FORMATS[codec].decode(stored, "m.weight", spec)
    assert spec["dtype"] == str(dtype).removeprefix("torch.") and back.dtype == dtype
    assert sqnr(w.float(), back.float()) > (15 if codec == "int4" else 25)


@pytest.mark.parametrize(("codec", "columns", "version"), [("int8", False, 1), ("int8", True, 2), ("int4", True, 2), ("int4", False, 1)])
def test_column_scales_need_format_version_2(codec: str, columns: bool, version: int) -> None:
    """A version-1 reader would decode w / c without noticing the column scales."""
    _, spec, _ = _encode(codec, outlier_columns(3), group_size=32 if codec == "int4" else None, columns=columns)
    assert spec.get("column_scale", False) == columns
    assert FORMATS[codec].version(spec) == version
    assert format_version({"m.weight": spec}) == version


def test_int8_dynamic_and_fp8_are_format_1() -> None:
    for codec in ("int8-dynamic", "fp8"):
        _, spec, _ = _encode(codec, torch.randn(8, 64))
        assert FORMATS[codec].version(spec) == 1
    assert format_version({}) == 1


# ------------------------------------------------------------------------------- runtime modules


def _stored(codec: str, out: int, inp: int) -> tuple[dict[str, torch.Tensor], dict]:
    stored, spec, _ = _encode(
        codec, torch.randn(out, inp, generator=torch.Generator().manual_seed(2)), group_size=32 if codec == "int4" else None
    )
    return {**stored, "m.bias": torch.randn(out)}, spec


@pytest.mark.parametrize("codec", ["int8", "int8-dynamic", "int4", "fp8"])
def test_runtime_module_for_each_layer_kind(codec: str) -> None:
    big = 512 * 256  # above qmodules.SMALL_LAYER: worth running the stored form
    assert big > qmodules.SMALL_LAYER
    tensors, spec = _stored(codec, 512, 256)
    fmt = FORMATS[codec]
    mod = fmt.runtime(nn.Linear(256, 512), tensors, "m.weight", spec)
    assert type(mod) is qmodules.QuantLinear
    assert torch.equal(mod.bias, tensors["m.bias"])
    torch.testing.assert_close(mod.weight, fmt.decode(tensors, "m.weight", spec))
    emb = fmt.runtime(nn.Embedding(512, 256), tensors, "m.weight", spec)
    assert type(emb) is qmodules.QuantEmbedding
    assert fmt.runtime(nn.Embedding(512, 256, max_norm=1.0), tensors, "m.weight", spec) is None  # renormalises rows in place
    small, small_spec = _stored(codec, 32, 64)
    small_mod = fmt.runtime(nn.Linear(64, 32), small, "m.weight", small_spec)
    assert (type(small_mod) is qmodules.QuantLinear) if codec == "fp8" else small_mod is None  # fp8 keeps its GPU matmul path
    conv, conv_spec = _stored(codec, 512, 256)
    assert fmt.runtime(nn.Conv1d(256, 512, 1), conv, "m.weight", conv_spec) is None


def test_every_quantized_codec_is_registered_under_its_name() -> None:
    for codec in ("int8", "int8-dynamic", "int4", "fp8"):
        assert FORMATS[codec].name == codec


def test_int8_dynamic_with_column_scales_declares_format_2() -> None:
    """The writer never gives int8-dynamic column scales, but the format encodes and decodes them; its
    version must say so (or encode must refuse them)."""
    w = outlier_columns(4)
    qz = grid.quantize_rtn(w, IntFormat(8), None, grid.column_scales(w))
    try:
        _, spec = FORMATS["int8-dynamic"].encode("m.weight", qz, shape=w.shape, dtype=w.dtype, group_size=None)
    except (ValueError, InfercompError):
        return  # refusing column scales is a fix too
    assert spec["column_scale"] is True
    assert FORMATS["int8-dynamic"].version(spec) == 2


# ------------------------------------------------------------------------- pack-quantized


@pytest.mark.parametrize(
    ("codec", "group_size", "symmetric"), [("int4", 32, True), ("int4", 64, False), ("int8", None, True), ("int8", 32, True)]
)
def test_pack_quantized_holds_the_same_numbers_as_ours(codec: str, group_size: int | None, symmetric: bool) -> None:
    """Converting our int4 / int8 to compressed-tensors' int32 packing and back loses nothing: the
    same stored bytes, the same decoded weight, and a runtime module that computes the same."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))  # big enough to run quantized
    stored, spec, expected = _encode(codec, w, group_size=group_size, symmetric=symmetric)
    pack = FORMATS["pack-quantized"]
    packed, pspec = pack.from_ours(stored, "m.weight", spec)
    assert set(packed) == set(pack.keys("m.weight", pspec)) and packed["m.weight_packed"].dtype == torch.int32
    assert packed["m.weight_packed"].shape == (256, 512 * INT_BITS[codec] // 32)
    assert packed["m.weight_shape"].tolist() == [256, 512] and format_version({"m.weight": pspec}) == 3
    assert torch.equal(pack.decode(packed, "m.weight", pspec), expected)
    back, bspec = pack.to_ours(packed, "m.weight", pspec)
    assert bspec["codec"] == codec and all(torch.equal(back[k], stored[k]) for k in stored)
    old = nn.Linear(512, 256)
    packed["m.bias"] = old.bias.detach()
    mod = pack.runtime(old, packed, "m.weight", pspec)
    x = torch.randn(3, 512)
    assert type(mod) is qmodules.QuantLinear
    torch.testing.assert_close(mod(x), torch.nn.functional.linear(x, expected, old.bias.detach()))


@pytest.mark.parametrize("block", [grid.PACK_VALUES, 50])  # 50: a block of one row at a time
@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_is_compressed_tensors_own(bits: int, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Word for word what compressed-tensors' packer writes (the library transformers and vLLM load
    it with), for weights and for zero points packed along the output dimension, whether the rows
    are packed together or a block at a time."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    monkeypatch.setattr(grid, "PACK_VALUES", block)
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 40), dtype=torch.int8, generator=g)  # 40: not a whole word multiple
    offset = 1 << (bits - 1)
    assert torch.equal(grid.pack_int32(q.to(torch.int16) + offset, bits), helpers.pack_to_int32(q, bits))
    assert torch.equal(grid.pack_int32(q.to(torch.int16).t() + offset, bits).t(), helpers.pack_to_int32(q, bits, packed_dim=0))
    assert torch.equal(grid.unpack_int32(grid.pack_int32(q.to(torch.int16) + offset, bits), bits, 40), q.to(torch.int16) + offset)


@pytest.mark.parametrize(("codec", "group_size", "symmetric", "columns", "keys"), CASES)
def test_nonzero_from_the_integers_is_the_decoded_count(
    codec: str, group_size: int | None, symmetric: bool, columns: bool, keys: set[str]
) -> None:
    """What static_stats counts without decoding: the same number as decoding and counting, with
    zeros and tiny values in the weight; float16 weights (which could underflow) are decoded."""
    del keys
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    w[:, :40] = 0  # whole groups of zeros
    w[3] *= 1e-9  # a row of tiny values: scale clamped, integers near zero
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        stored, spec, _ = _encode(codec, w.to(dtype), group_size=group_size, symmetric=symmetric, columns=columns)
        decoded = FORMATS[codec].decode(stored, "m.weight", spec)
        expected = int(torch.count_nonzero(decoded.float()))
        got = FORMATS[codec].nonzero(stored, "m.weight", spec)
        assert got is None if (codec == "fp8" or dtype == torch.float16) else got == expected, (dtype, got, expected)
        if codec in ("int8", "int4") and not columns and dtype == torch.float32:
            packed, pspec = FORMATS["pack-quantized"].from_ours(stored, "m.weight", spec)
            assert FORMATS["pack-quantized"].nonzero(packed, "m.weight", pspec) == expected


def test_nonzero_of_damaged_parts_is_a_checkpoint_error() -> None:
    """static_stats counts from the stored parts: a file missing one, or with parts that do not fit
    the spec, is the same one-line CheckpointError decoding gives, not a KeyError."""
    import infercomp.formats as formats

    stored, spec, _ = _encode("int4", torch.randn(8, 64), group_size=32, symmetric=False)
    del stored["m.weight_zero_point"]
    with pytest.raises(InfercompError, match="lacks stored tensor 'm.weight_zero_point'"):
        formats.nonzero(stored, "m.weight", spec)
    stored, spec, _ = _encode("int8", torch.randn(8, 64))
    stored["m.weight"] = stored["m.weight"][:3]
    with pytest.raises(InfercompError, match="cannot be decoded from its stored parts"):
        formats.nonzero(stored, "m.weight", spec)
    stored, spec, _ = _encode("int4", torch.randn(8, 64), group_size=32)  # symmetric: counted in the packed bytes
    stored["m.weight_packed"] = stored["m.weight_packed"][:3]
    with pytest.raises(InfercompError, match="cannot be decoded from its stored parts"):
        formats.nonzero(stored, "m.weight", spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.bool])
def test_count_nonzero_is_torchs_count_in_any_dtype(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    import infercomp.formats.base as base

    monkeypatch.setattr(base, "COUNT_BLOCK", 7)  # counted in blocks that split rows
    t = torch.tensor([[0.0, -0.0, 1.5, float("nan")], [0.25, 0.0, -3.0, 0.0], [2.0, 0.0, 0.0, 1.0]])
    if dtype == torch.bool or not dtype.is_floating_point:
        t = torch.nan_to_num(t).to(dtype)
    else:
        t = t.to(dtype)
    expected = int(torch.count_nonzero(t.float()))  # NaN counts, -0.0 does not
    assert base.count_nonzero(t) == base.count_nonzero(t.t()) == expected
    if t.is_floating_point():
        assert expected == 6  # 1.5, NaN, 0.25, -3, 2, 1: neither 0.0 nor -0.0
