"""formats/grid.py: the integer and fp8 grids, RTN, column scales, int4 packing (pure tensor code)."""

from __future__ import annotations

import pytest
import torch

import infercomp.formats.grid as grid
from infercomp.formats.grid import IntFormat
from infercomp.metrics import sqnr
from tests.conftest import outlier_columns


@pytest.mark.parametrize(("bits", "symmetric", "lo", "hi"), [(8, True, -128, 127), (4, True, -8, 7), (4, False, 0, 15)])
def test_int_format_ranges(bits: int, symmetric: bool, lo: int, hi: int) -> None:
    assert (IntFormat(bits, symmetric).qmin, IntFormat(bits, symmetric).qmax) == (lo, hi)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_pack_unpack_is_exact(symmetric: bool) -> None:
    fmt = IntFormat(4, symmetric)
    q = torch.randint(fmt.qmin, fmt.qmax + 1, (7, 64), dtype=torch.int8)
    packed = grid.pack_int4(q, symmetric)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)  # two values per byte
    assert torch.equal(grid.unpack_int4(packed, symmetric), q)


def test_int4_packing_puts_even_columns_in_the_low_nibble() -> None:
    """compressed-tensors' layout: column 2j low, 2j + 1 high; symmetric values offset by 8."""
    q = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    assert grid.pack_int4(q, True).tolist() == [[0 | (15 << 4), 8 | (7 << 4)]]
    assert grid.pack_int4(torch.tensor([[3, 12]], dtype=torch.int8), False).tolist() == [[3 | (12 << 4)]]


@pytest.mark.parametrize(("bits", "group_size", "floor"), [(8, None, 38.0), (8, 32, 38.0), (4, 32, 18.0), (4, 64, 17.0)])
def test_rtn_stays_on_the_grid_and_reaches_its_sqnr(bits: int, group_size: int | None, floor: float) -> None:
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(0))
    fmt = IntFormat(bits)
    z = grid.quantize_rtn(w, fmt, group_size)
    assert z.q.dtype == torch.int8 and int(z.q.min()) >= fmt.qmin and int(z.q.max()) <= fmt.qmax
    assert z.scale.shape == (24, 1 if group_size is None else 128 // group_size) and z.zero_point is None
    assert sqnr(w, grid.dequantize(z.q, z.scale, None)) >= floor


def test_asymmetric_zero_point_represents_zero_exactly() -> None:
    w = torch.rand(6, 32, generator=torch.Generator().manual_seed(1)) + 0.5  # all positive: only [0, max] matters
    w[:, 3] = 0.0
    z = grid.quantize_rtn(w, IntFormat(4, symmetric=False), 32)
    assert z.zero_point is not None and z.zero_point.shape == (6, 1)
    back = grid.dequantize(z.q, z.scale, z.zero_point)
    assert torch.equal(back[:, 3], torch.zeros(6))
    assert sqnr(w, back) > 18


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (8, 128), (4, 32)])
def test_column_scales_cut_error_on_outlier_columns(bits: int, group_size: int | None) -> None:
    w = outlier_columns(6)
    plain = grid.quantize_rtn(w, IntFormat(bits), group_size)
    cs = grid.column_scales(w)
    scaled = grid.quantize_rtn(w, IntFormat(bits), group_size, cs)
    assert cs.dtype == torch.float8_e4m3fn and cs.shape == (256,) and bool((cs.float() > 0).all())
    err = [sqnr(w, grid.dequantize(z.q, z.scale, None, column_scale=z.column_scale)) for z in (plain, scaled)]
    assert err[1] > err[0] + 3, err
    assert grid.choose_column_scale(w, IntFormat(bits), group_size).column_scale is not None


def test_column_scales_are_left_out_where_they_do_not_help() -> None:
    w = torch.ones(8, 64)  # every column alike: nothing to equalize, plain RTN is exact
    assert grid.choose_column_scale(w, IntFormat(8), None).column_scale is None


def test_int8_group_scales_beat_per_channel() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g) * torch.logspace(-2, 0, 256)  # columns of very different size
    per_channel = grid.quantize_rtn(w, IntFormat(8), None)
    grouped = grid.quantize_rtn(w, IntFormat(8), 32)
    err = [sqnr(w, grid.dequantize(z.q, z.scale, None)) for z in (per_channel, grouped)]
    assert grouped.scale.shape == (32, 8) and err[1] > err[0] + 3


def test_tiny_scales_are_stored_in_float32() -> None:
    w = torch.randn(4, 32) * 1e-6  # scales below float16's normal range
    z = grid.quantize_rtn(w, IntFormat(8), None)
    assert z.scale.dtype == torch.float32 and sqnr(w, grid.dequantize(z.q, z.scale, None)) > 38


def test_ordinary_scales_are_stored_in_float16() -> None:
    z = grid.quantize_rtn(torch.randn(4, 32, generator=torch.Generator().manual_seed(2)), IntFormat(8), None)
    assert z.scale.dtype == torch.float16


def test_conv_filters_are_quantized_as_rows() -> None:
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(4))
    z = grid.quantize_rtn(w, IntFormat(8), None)
    assert z.q.shape == (16, 72) and sqnr(w.reshape(16, -1), grid.dequantize(z.q, z.scale, None)) > 38


def test_fp8_round_trip() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * torch.logspace(-3, 1, 32).unsqueeze(1)
    q, s = grid.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (32, 1) and s.dtype == torch.float32
    assert float(q.float().abs().amax(dim=1).min()) == grid.FP8_MAX  # each row's largest value uses the top of the range
    back = grid.dequantize_fp8(q, s)
    assert back.shape == w.shape and sqnr(w, back) > 28
