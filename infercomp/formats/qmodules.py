"""Modules that run quantized weights in their stored form, swapped in by a format's ``runtime``
when a quantized checkpoint is loaded on a CUDA GPU (``infercomp.formats.quantized`` decides which
one replaces which layer). On the CPU, models are loaded with their weights decoded once and run
as ``--compute`` says (``infercomp.compute``): there, per-call dequantization measured no faster
than float32 and torch's weight-only int8 / int4 CPU kernels 30-65x slower at batch sizes above 1.

- ``int8`` / ``int8-dynamic`` / ``int4`` / ``fp8`` Linear (``QuantLinear``): weights stay compact
  in GPU memory and are dequantized per call into one float matrix, then a float matmul; weights
  may carry column scales (``weight_column_scale``): ``W = diag(s) Q diag(c)``.
- ``fp8`` on CUDA GPUs with compute capability >= 8.9: ``torch._scaled_mm`` (activations cast to
  fp8 per call with a per-tensor scale).
- Linear layers with at most ``SMALL_LAYER`` weights (not fp8) are decoded once at load.
- Embedding tables (``QuantEmbedding``): rows are gathered in their stored form, then
  dequantized (only the rows used).
- Convolutions and other layers: the weight is dequantized once at load and the layer runs in float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import infercomp.formats.grid as grid
from infercomp.formats.base import Spec, Tensors

# Linear layers with at most this many weights are decoded to float at load (<= 256 KiB each): at
# that size the per-call work of any quantized path (dequantizing, quantizing the activations)
# costs more than the matmul itself (the digits models ran 2-3x slower without it).
SMALL_LAYER = 65536


class StoredWeight(nn.Module):
    """A quantized weight in its stored form, as buffers: ``qdata`` (int8 values, packed int4 bytes
    or fp8), ``scale`` (out, groups), ``zero_point`` (out, groups) or None, and ``column_scale``
    (in,) or None."""

    def __init__(
        self,
        kind: str,
        shape: list[int],
        qdata: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        symmetric: bool,
        column_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.kind, self.shape, self.symmetric = kind, list(shape), symmetric
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("scale", scale.reshape(shape[0], -1).contiguous())
        self.register_buffer("zero_point", None if zero_point is None else zero_point.reshape(shape[0], -1).contiguous())
        # Column scales are stored as float8 (one byte per column); kept as float32 here (4 bytes per column).
        self.register_buffer("column_scale", None if column_scale is None else column_scale.reshape(-1).float())

    def rows(self, index: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows (out, in), or only the rows ``index`` (any shape) -> (*index.shape, in)."""
        q, s, z = self.qdata, self.scale, self.zero_point
        if index is not None:
            flat = index.reshape(-1)
            q, s = q[flat], s[flat]
            z = None if z is None else z[flat]
        if self.kind == "fp8":
            w = grid.dequantize_fp8(q, s, dtype)
        else:
            ints = grid.unpack_int4(q, self.symmetric) if self.kind == "int4" else q
            w = grid.dequantize(ints, s, z, dtype, self.column_scale)
        return w if index is None else w.reshape(*index.shape, w.shape[-1])

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(dtype=dtype).reshape(self.shape)


class _QuantLinearBase(nn.Module):
    """What the quantized Linear layers share: the stored weight, a float bias, the dense view of
    the weight."""

    def __init__(self, weight: StoredWeight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape[0], weight.shape[1]
        self.weight_q = weight
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for code that reads ``layer.weight`` (dtype checks, tied heads)."""
        return self.weight_q.dense()


class QuantLinear(_QuantLinearBase):
    """Linear with a weight-only quantized weight (int8, int4 or fp8)."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight_q.kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        wq = self.weight_q
        if (
            wq.kind == "fp8"
            and x2.is_cuda
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and fp8_matmul_supported(x2.device)
        ):
            y = _fp8_linear(x2, wq)
        else:
            y = F.linear(x2, wq.rows(dtype=x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def fp8_matmul_supported(device: torch.device) -> bool:
    """torch._scaled_mm runs float8 matmuls on CUDA GPUs of compute capability 8.9 (Ada) and up."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_linear(x2: torch.Tensor, wq: StoredWeight) -> torch.Tensor:
    # (M, K) activations -> fp8 with one scale; (N, K) fp8 weights with per-row scales, applied after.
    out_dtype = x2.dtype if x2.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    xs = (x2.abs().amax().float() / grid.FP8_MAX).clamp(min=1e-12)
    xq = (x2.float() / xs).clamp(-grid.FP8_MAX, grid.FP8_MAX).to(torch.float8_e4m3fn)
    m = xq.shape[0]
    pad = (-m) % 16  # _scaled_mm wants dimensions divisible by 16
    if pad:
        xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
    one = torch.ones((), device=x2.device)
    y = torch._scaled_mm(xq, wq.qdata.t(), scale_a=one, scale_b=one, out_dtype=out_dtype)[:m]
    return (y.float() * xs * wq.scale.reshape(1, -1).float()).to(x2.dtype)


class QuantEmbedding(nn.Module):
    """Embedding table kept quantized; a lookup dequantizes only the rows it gathers."""

    def __init__(self, weight: StoredWeight, old: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = old.padding_idx
        self.weight_q = weight
        self.dtype = old.weight.dtype  # a bf16 model gets bf16 rows, as its next layer expects

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q.dense()

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.weight_q.rows(index, dtype=self.dtype)


def column_scale_of(tensors: Tensors, name: str, spec: Spec) -> torch.Tensor | None:
    """The stored column scales of the encoded tensor ``name``, or None."""
    return tensors[f"{name}_column_scale"] if spec.get("column_scale") else None


def stored_weight(kind: str, tensors: Tensors, name: str, spec: Spec) -> StoredWeight:
    """The stored parts of the encoded tensor ``name`` (see ``infercomp.formats.quantized``)."""
    shape = spec["shape"]
    cs = column_scale_of(tensors, name, spec)
    if kind == "int4":
        zp = tensors.get(f"{name}_zero_point")
        return StoredWeight("int4", shape, tensors[f"{name}_packed"], tensors[f"{name}_scale"], zp, spec.get("symmetric", True), cs)
    qdata = tensors[name].reshape(shape[0], -1)
    return StoredWeight(kind, shape, qdata, tensors[f"{name}_scale"], None, True, cs)
