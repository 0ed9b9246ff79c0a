"""formats/qmodules.py: the modules that run quantized weights in their stored form (QuantLinear,
QuantEmbedding), checked against the float layers by SQNR and against the decoded weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infercomp.formats.grid as grid
import infercomp.formats.qmodules as qmodules
from infercomp.formats.grid import IntFormat
from infercomp.formats.qmodules import QuantEmbedding, QuantLinear, StoredWeight
from infercomp.metrics import sqnr
from tests.conftest import outlier_columns

# Output SQNR (dB) against the float layer each stored kind must reach on Gaussian weights and inputs.
MIN_SQNR = {"int8": 35.0, "int4": 15.0, "fp8": 25.0}


def _stored(kind: str, w: torch.Tensor, group_size: int | None = None, columns: bool = False) -> StoredWeight:
    if kind == "fp8":
        q, s = grid.quantize_fp8(w)
        return StoredWeight("fp8", list(w.shape), q, s, None, True)
    cs = grid.column_scales(w) if columns else None
    qz = grid.quantize_rtn(w, IntFormat(8 if kind == "int8" else 4), group_size, cs)
    data = qz.q if kind == "int8" else grid.pack_int4(qz.q, True)
    return StoredWeight(kind, list(w.shape), data, qz.scale, None, True, cs)


# ---------------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize(("kind", "group_size"), [("int8", None), ("int8", 32), ("int4", 32), ("fp8", None)])
@pytest.mark.parametrize("rows", [1, 8])
def test_quant_linear_sqnr_against_the_float_layer(kind: str, group_size: int | None, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 384)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 256, generator=g) * 0.05)
    mod = QuantLinear(_stored(kind, lin.weight.detach(), group_size), lin.bias.detach())
    x = torch.randn(rows, 7, 256, generator=g)
    with torch.inference_mode():
        y, ref = mod(x), lin(x)
    assert y.shape == (rows, 7, 384) and y.dtype == torch.float32
    assert sqnr(ref, y) > MIN_SQNR[kind], sqnr(ref, y)


@pytest.mark.parametrize(
    ("kind", "group_size", "columns"),
    [("int8", None, False), ("int8", None, True), ("int8", 32, False), ("int4", 32, True), ("fp8", None, False)],
)
@pytest.mark.parametrize("rows", [1, 8])
def test_large_linear_runs_what_was_stored(kind: str, group_size: int | None, columns: bool, rows: int) -> None:
    """Layers above qmodules.SMALL_LAYER keep only the stored form: kernel (1 row) or per-call dequantization."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(512, 256, generator=g) * 0.05, torch.randn(512, generator=g)
    if kind == "fp8":
        q, s = grid.quantize_fp8(w)
        stored, z = StoredWeight("fp8", [512, 256], q, s, None, True), None
    else:
        cs = grid.column_scales(w) if columns else None
        qz = grid.quantize_rtn(w, IntFormat(8 if kind == "int8" else 4), group_size, cs)
        data = qz.q if kind == "int8" else grid.pack_int4(qz.q, True)
        stored, z = StoredWeight(kind, [512, 256], data, qz.scale, None, True, cs), qz
    mod = QuantLinear(stored, b)
    x = torch.randn(rows, 256, generator=g)
    decoded = grid.dequantize_fp8(q, s) if z is None else grid.dequantize(z.q, z.scale, None, column_scale=z.column_scale)
    with torch.inference_mode():
        assert torch.allclose(mod(x), F.linear(x, decoded, b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mod.weight, decoded)  # the dense view code reads as layer.weight


# ------------------------------------------------------------------------------- QuantEmbedding


@pytest.mark.parametrize(("kind", "group_size", "floor"), [("int8", None, 38.0), ("int4", 32, 18.0), ("fp8", None, 28.0)])
def test_quantized_embedding_sqnr_against_the_float_table(kind: str, group_size: int | None, floor: float) -> None:
    emb = nn.Embedding(100, 64)
    q = QuantEmbedding(_stored(kind, emb.weight.detach(), group_size), emb)
    idx = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, ref = q(idx), emb(idx)
    assert out.shape == (4, 12, 64) and sqnr(ref, out) > floor, sqnr(ref, out)
    torch.testing.assert_close(out, q.weight[idx])  # gathering stored rows = indexing the decoded table


def test_quantized_embedding_with_column_scales_gathers_decoded_rows() -> None:
    w = outlier_columns(8, rows=40, cols=32)
    cs = grid.column_scales(w)
    qz = grid.quantize_rtn(w, IntFormat(8), None, cs)
    emb = QuantEmbedding(StoredWeight("int8", [40, 32], qz.q, qz.scale, None, True, cs), nn.Embedding(40, 32))
    idx = torch.tensor([[3, 0, 39], [7, 7, 1]])
    decoded = grid.dequantize(qz.q, qz.scale, None, column_scale=cs)
    assert torch.equal(emb(idx), decoded[idx])


def test_quantized_embedding_keeps_the_model_dtype() -> None:
    emb = nn.Embedding(32, 16).bfloat16()
    qz = grid.quantize_rtn(emb.weight.detach().float(), IntFormat(8), None)
    q = QuantEmbedding(StoredWeight("int8", [32, 16], qz.q, qz.scale, None, True), emb)
    out = q(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 16)
    nn.LayerNorm(16).bfloat16()(out)  # the next layer accepts it


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_on_cuda_matches_dequantized() -> None:
    """On GPUs with fp8 support the Linear runs torch._scaled_mm; elsewhere it dequantizes. Both
    must agree with the float result of the decoded weights."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 128, generator=g) * 0.05, torch.randn(64, generator=g)
    q, s = grid.quantize_fp8(w)
    mod = QuantLinear(StoredWeight("fp8", [64, 128], q, s, None, True), b).cuda()
    x = torch.randn(40, 128, generator=g).cuda()
    with torch.inference_mode():
        y = mod(x)
        ref = F.linear(x, grid.dequantize_fp8(q, s).cuda(), b.cuda())
    assert y.shape == (40, 64) and y.dtype == torch.float32
    assert sqnr(ref.float().cpu(), y.float().cpu()) > (20 if qmodules.fp8_matmul_supported(x.device) else 60)
