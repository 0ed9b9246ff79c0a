"""Modules that run quantized weights directly, swapped in when a quantized checkpoint is loaded
(``infercomp.formats.quantized`` decides which one replaces which layer).

What runs where (measured on CPU with torch 2.13; ``bench/bench_quantize.py`` repeats it):
- ``int8-dynamic`` Linear: per-channel int8 weights, activations quantized per call with one
  scale per row (token), int8 x int8 matmul with int32 accumulation (``torch._int_mm``). torch's
  fused ``quantized.linear_dynamic`` (fbgemm) is faster still but quantizes activations per
  tensor, which loses most of the output's precision on MiniLM even with per-channel 8-bit
  settings (``bench/bench_quantize.py`` prints both side by side).
- Weight-only layers may carry column scales (``weight_column_scale``): ``W = diag(s) Q diag(c)``.
- ``int8`` / ``int4`` / ``fp8`` weight-only Linear: weights stay compact in memory and are
  dequantized per call into one float matrix, then a float matmul. torch's int8 weight-only CPU
  kernel (``_weight_int8pack_mm``) is used only for single-row inputs (token-by-token decoding):
  its cost grows with the batch and reached 30x the float32 matmul at 32 rows, which is what made
  int8 models slower than float32. ``_weight_int4pack_mm_for_cpu`` took 65x the float matmul at
  4096 rows, so int4 is not run through it.
- Linear layers with at most ``SMALL_LAYER`` weights (not fp8) are decoded once at load and stay
  plain ``nn.Linear``: at that size any per-call quantized work, even a Python wrapper around the
  float matmul, costs more than the matmul itself.
- ``fp8`` on CUDA GPUs with compute capability >= 8.9: ``torch._scaled_mm`` (activations cast to
  fp8 per call with a per-tensor scale).
- Embedding tables: rows are gathered in their stored form, then dequantized (only the rows used).
- Convolutions and other layers: the weight is dequantized once at load and the layer runs in float.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

import infercomp.formats.grid as grid
from infercomp.formats.base import Spec, Tensors

# Rows of input up to which torch's weight-only CPU kernels beat dequantize + float matmul.
KERNEL_MAX_ROWS = 1
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

    def __init__(self, weight: StoredWeight, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self._int8_kernel = weight.kind == "int8" and weight.scale.shape[1] == 1

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
        elif self._int8_kernel and x2.shape[0] <= KERNEL_MAX_ROWS and x2.device.type == "cpu" and x2.dtype == torch.float32:
            xc = x2 if wq.column_scale is None else x2 * wq.column_scale  # W = diag(s) Q diag(c)
            y = torch._weight_int8pack_mm(xc.contiguous(), wq.qdata, wq.scale.reshape(-1).to(x2.dtype))
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


class DynamicInt8Linear(_QuantLinearBase):
    """Linear with per-channel int8 weights whose activations are quantized per call, one scale
    per row (token), to the full 8 bits, and multiplied in int8 (``torch._int_mm``, int32
    accumulation). When rows are skewed (GELU outputs), each row is centred on the midpoint of its
    range (a whole number of steps) before rounding, so it uses 254 levels instead of about 128;
    the centre is added back exactly as a rank-1 term.

    torch.ao's default dynamic quantization instead uses one scale for the whole activation tensor
    and 7 bits (``reduce_range``): outlier tokens then flatten every other token's resolution."""

    def __init__(self, weight: StoredWeight, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        # Integer row sums of the weight (they add the row centres back), the bias, the row scales.
        self.register_buffer("_qsum", weight.qdata.sum(dim=1, dtype=torch.int32).float().reshape(1, -1), persistent=False)
        self.register_buffer("_bias", torch.zeros(self.out_features) if bias is None else bias.float(), persistent=False)
        self.register_buffer("_wscale", weight.scale.reshape(1, -1).float(), persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type != "cpu" or x2.dtype != torch.float32:
            y = F.linear(x2, self.weight_q.rows(dtype=x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))
            return y.reshape(*x.shape[:-1], self.out_features)
        m, n = x2.shape[0], self.out_features
        if self.weight_q.column_scale is not None:  # W = diag(s) Q diag(c): scale the inputs instead
            x2 = x2 * self.weight_q.column_scale
        xq, step, centre = _quantize_rows(x2)
        acc = _scratch(2, torch.int32, m * n).view(m, n)
        torch._int_mm(xq, self.weight_q.qdata.t(), out=acc)  # (M, N) int32
        # y = step * (acc + centre (x) qsum) * wscale + bias, with centre = row midpoint / step
        y = acc.to(torch.float32)
        if centre is not None:
            y.addcmul_(centre, self._qsum)
        y.mul_(self._wscale)
        y = torch.addcmul(self._bias, y, step, out=y)
        return y.reshape(*x.shape[:-1], self.out_features)


# Adding 1.5 * 2**23 to a float32 in (-2**22, 2**22) rounds it to an integer (to nearest, ties to
# even) that sits in the low bits of the sum's bit pattern: viewed as int32, its low byte is the
# value as int8. This replaces a separate round pass.
_ROUND_MAGIC = 12582912.0


def _magic_round_works() -> bool:
    """Whether this torch converts int32 -> int8 by keeping the low byte (checked once, at import)."""
    values = torch.arange(-127, 128, dtype=torch.float32).repeat(8)  # long enough for the vectorised path
    return torch.equal((values + _ROUND_MAGIC).view(torch.int32).to(torch.int8), values.to(torch.int8))


_MAGIC_ROUND = _magic_round_works()


def _quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Activations (M, K) -> (int8 (M, K), step (M, 1), row centres in steps (M, 1) or None):
    ``x ~ step * (q + centre)``.

    (Reusing the result when query, key and value read the same tensor would save a little, but
    inference tensors carry no version counter, so an in-place update could not be detected.)"""
    m, k = x2.shape
    hi, lo = x2.amax(dim=1, keepdim=True), x2.amin(dim=1, keepdim=True)  # (M, 1)
    # Centre rows when some row is skewed (its midpoint off zero by > 1/4 of its range, e.g.
    # GELU outputs); otherwise the cheaper symmetric form loses little.
    centre = bool(((hi + lo).abs() > 0.5 * (hi - lo)).any())
    # Intermediates go to per-thread scratch buffers: fresh multi-MB tensors cost page faults on
    # every call (glibc hands them out as new mappings), which took a third of the time.
    xf = _scratch(0, torch.float32, m * k).view(m, k)
    if centre:
        # 253 steps over the range and a centre on the grid (a whole number of steps), so that
        # x / step - centre stays within [-127, 127] and the magic offset below stays exact.
        # (A row whose range is tiny next to its midpoint gets a coarser step, keeping centres
        # below 2**20 steps, where float32 still holds them exactly.)
        step = torch.maximum((hi - lo) / 253, (hi + lo).abs() * 2.0**-21).clamp(min=1e-12)
        inv = 1.0 / step
        mid = torch.round((hi + lo) * 0.5 * inv)
        # (One mul and one add: addcmul with two broadcast (M, 1) operands is 5x slower here.)
        torch.mul(x2, inv, out=xf).add_(_ROUND_MAGIC - mid)
    else:
        mid = None
        step = (torch.maximum(hi, -lo) / 127).clamp(min=1e-12)
        torch.mul(x2, 1.0 / step, out=xf).add_(_ROUND_MAGIC)
    xq = _scratch(1, torch.int8, m * k).view(m, k)
    if _MAGIC_ROUND:
        xq.copy_(xf.view(torch.int32))  # int32 -> int8 keeps the low byte: the rounded value in [-127, 127]
    else:
        xq.copy_(xf.sub_(_ROUND_MAGIC))  # already integral floats
    return xq, step, mid


_SCRATCH = threading.local()


def _scratch(slot: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat per-thread buffer for intermediates, grown as needed and reused across calls."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        # Allocated outside inference mode: an inference tensor could not be written to later by a
        # call made under no_grad or plain autograd.
        with torch.inference_mode(False):
            buf = bufs[slot] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


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
