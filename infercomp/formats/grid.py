"""Quantizers and storage formats: float weight -> integers (or fp8) + scales (+ zero points),
and back. Pure tensor code, no modules.

Every quantizer works on the weight viewed as rows ``(out, in)`` (a conv filter bank is
``(out, in * kh * kw)``, an embedding table ``(vocab, dim)``), split into groups of ``group_size``
consecutive columns, or one group per row (``group_size=None``: per output channel).
Dequantized value = ``(q - zero_point) * scale`` for each group.

Column scales (data-free equalization): weight-only RTN can also divide each input column by
``c_j = sqrt(max_i |w_ij|)`` (normalised to mean 1) before choosing the row scales, and multiply it
back when decoding: ``w_ij ~ (q_ij - z) * s_i * c_j``. One outlier column then no longer sets the
step of every row it crosses. On all-MiniLM-L6-v2 (int8, per channel) this raised output SQNR from
27.7 to 31.4 dB for one byte (float8 e4m3) per input column. A tensor gets column scales when they
lower its reconstruction error (``choose_column_scale``).

Scales are stored in float16 when every scale is a normal float16 (half the bytes of float32 and
an error of 2**-11 relative, far below the quantization step), else float32. The quantizer rounds
with the *stored* scale, so unpacking reproduces its values exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP16_NORMAL_MIN = 6.2e-5  # smallest normal float16 is 6.104e-5
FP16_MAX = 6.0e4
FP8_MAX = 448.0  # largest finite float8_e4m3fn
COLUMN_SCALE_ALPHA = 0.5  # c_j = colmax_j ** alpha


@dataclass(frozen=True)
class IntFormat:
    """An integer grid: ``bits``, symmetric (zero point 0, range [-2**(b-1), 2**(b-1)-1]) or
    asymmetric (range [0, 2**b - 1] with a per-group zero point)."""

    bits: int
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass
class Quantized:
    """Integer weights and their group parameters.

    Attributes:
        q: (out, in) int8 (values on the format's grid, asymmetric int4 in [0, 15]).
        scale: (out, groups) float16/float32.
        zero_point: (out, groups) int8, or None for symmetric formats.
        column_scale: (in,) float8 e4m3 scale of each column of the rows view, or None.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    column_scale: torch.Tensor | None = None


def rows(w: torch.Tensor) -> torch.Tensor:
    """(out, ...) -> (out, in) float32 view of a weight."""
    return w.float().reshape(w.shape[0], -1)


def storable_scale(scale: torch.Tensor) -> torch.Tensor:
    """float16 when all scales are normal float16 numbers, else float32 (tiny or huge weights)."""
    if bool(((scale >= FP16_NORMAL_MIN) & (scale <= FP16_MAX)).all()):
        return scale.to(torch.float16)
    return scale.float()


def group_params(w: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of ``w`` (G, g) -> (G,) each.

    Symmetric: scale = 2 * max|w| / (qmax - qmin), so +-max|w| lands on the grid's ends (for int4,
    15 levels over [-7.5, 7.5] steps, rounding to [-8, 7]). Asymmetric: scale = (max - min) / qmax,
    zero point = round(-min / scale) so that 0.0 is exactly representable."""
    if fmt.symmetric:
        return _params_of(w.abs().amax(dim=-1), None, fmt)
    return _params_of(w.amax(dim=-1), w.amin(dim=-1), fmt)


def _params_of(hi: torch.Tensor, lo: torch.Tensor | None, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``group_params`` from each group's max|w| (symmetric: ``lo`` None) or max and min."""
    if lo is None:
        return storable_scale((2 * hi / (fmt.qmax - fmt.qmin)).clamp(min=1e-12)), None
    lo = lo.clamp(max=0)
    hi = hi.clamp(min=0)
    scale = storable_scale(((hi - lo) / fmt.qmax).clamp(min=1e-12))
    zp = torch.round(-lo / scale.float()).clamp(0, fmt.qmax).to(torch.int8)
    return scale, zp


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: IntFormat) -> torch.Tensor:
    """Round ``w`` (..., g) onto the grid with per-row ``scale`` / ``zero_point`` (...,)."""
    t = w / scale.float()[..., None]
    if zero_point is not None:  # symmetric: + 0.0 changes nothing that survives rounding to an integer
        t.add_(zero_point.float()[..., None])
    return t.round_().clamp_(fmt.qmin, fmt.qmax).to(torch.int8)


# Round to nearest runs over blocks of whole rows (about BLOCK values, a few hundred KiB: they stay
# in cache, and below glibc's mmap threshold no page is faulted in per temporary), on up to WORKERS
# threads (torch releases the GIL). Each value comes from the same elementwise operations and
# per-row maxima whatever the block or thread count, so the integers depend on neither; the one
# sum that decides something (``choose_column_scale``'s errors) is taken over the whole tensor in
# one call on the caller's thread, as before.
BLOCK = 1 << 17
WORKERS = 4


def _row_blocks(out: int, n: int) -> list[slice]:
    step = max(1, BLOCK // max(n, 1))
    return [slice(i, min(i + step, out)) for i in range(0, out, step)]


def _each(fn: Callable[[int, slice], object], blocks: list[slice]) -> None:
    """``fn(i, block)`` for every block of rows, on up to ``WORKERS`` threads."""
    workers = min(WORKERS, os.cpu_count() or 1, len(blocks))
    if workers <= 1:
        for i, b in enumerate(blocks):
            fn(i, b)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, range(len(blocks)), blocks):  # re-raises a block's exception
            pass


class _Rounder:
    """Round to nearest of ``w`` (out, in) in blocks of rows; see ``quantize_rtn``."""

    def __init__(self, w: torch.Tensor, fmt: IntFormat, group_size: int | None):
        self.w, self.fmt = w, fmt
        self.out, self.n = w.shape
        self.g = self.n if group_size is None else group_size
        self.blocks = _row_blocks(self.out, self.n)

    def each(self, fn: Callable[[int, slice], object]) -> None:
        _each(fn, self.blocks)

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, groups, g)."""
        return t.reshape(t.shape[0], self.n // self.g, self.g)

    def extremes(self) -> _Extremes:
        return _Extremes(self.out, self.n // self.g, self.fmt)

    def round(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, q: torch.Tensor, err: _Error | None = None) -> None:
        """``q`` (out, in) int8 = ``quantize_groups`` of ``x``; with ``err``, also the squared
        reconstruction error of ``dequantize(q, ...)`` against the weight, into ``err.into``."""
        fmt, s32 = self.fmt, scale.float()
        z32 = None if zp is None else zp.float()

        def block(_: int, b: slice) -> None:
            t = self.grouped(x[b]) / s32[b, :, None]  # (rows, groups, g)
            if z32 is not None:
                t.add_(z32[b, :, None])
            t.round_().clamp_(fmt.qmin, fmt.qmax)
            q[b] = t.reshape(q[b].shape)
            if err is None:
                return
            # ``dequantize`` of the stored integers minus the weight, squared: the same operations in order.
            t.copy_(q[b].reshape(t.shape))
            if z32 is not None:
                t.sub_(z32[b, :, None])
            t.mul_(s32[b, :, None])
            d = t.reshape(q[b].shape)
            if err.column_scale is not None:
                d.mul_(err.column_scale)
            torch.sub(d, self.w[b], out=err.into[b]).square_()

        self.each(block)


class _Extremes:
    """Each group's max |x| (symmetric formats) or max and min, filled in block by block."""

    def __init__(self, out: int, groups: int, fmt: IntFormat):
        self.fmt = fmt
        self.hi = torch.empty(out, groups)
        self.lo = None if fmt.symmetric else torch.empty(out, groups)

    def note(self, b: slice, xg: torch.Tensor, absolute: torch.Tensor | None = None) -> None:
        """Rows ``b`` from ``xg`` (rows, groups, g) (and its ``abs()`` when already taken)."""
        if self.lo is None:
            self.hi[b] = (xg.abs() if absolute is None else absolute).amax(dim=-1)
        else:
            self.hi[b] = xg.amax(dim=-1)
            self.lo[b] = xg.amin(dim=-1)

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``group_params``: (scale, zero point)."""
        return _params_of(self.hi, self.lo, self.fmt)


@dataclass
class _Error:
    """Where ``_Rounder.round`` writes squared errors (out, in), and the (in,) float32 column scales
    the dequantized weight is multiplied by (None: none)."""

    into: torch.Tensor
    column_scale: torch.Tensor | None


def quantize_rtn(w: torch.Tensor, fmt: IntFormat, group_size: int | None, column_scale: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest quantization of a weight, per output channel or per group of columns,
    optionally of ``w / column_scale`` (see ``column_scales``)."""
    w2 = rows(w)
    r = _Rounder(w2, fmt, group_size)
    x = w2 if column_scale is None else torch.empty(r.out, r.n)  # (out, in): w / c
    c = None if column_scale is None else column_scale.float()
    ext = r.extremes()

    def scan(_: int, b: slice) -> None:
        if c is not None:
            torch.div(w2[b], c, out=x[b])
        ext.note(b, r.grouped(x[b]))

    r.each(scan)
    scale, zp = ext.params()
    q = torch.empty(r.out, r.n, dtype=torch.int8)
    r.round(x, scale, zp, q)
    return Quantized(q=q, scale=scale, zero_point=zp, column_scale=column_scale)


def column_scales(w: torch.Tensor, alpha: float = COLUMN_SCALE_ALPHA) -> torch.Tensor:
    """(in,) float8 e4m3 scales ``colmax ** alpha``, normalised to mean 1. Column maxima are floored
    at 1e-4 of the largest, so the scales span at most 100x. One byte per column is enough: they
    only reshape the grid, and the quantizer divides by the stored (rounded) values."""
    w2 = rows(w)
    r = _Rounder(w2, IntFormat(8), None)
    maxima = torch.empty(len(r.blocks), r.n)  # each block's column maxima of |w|

    def scan(i: int, b: slice) -> None:
        maxima[i] = w2[b].abs().amax(dim=0)

    r.each(scan)
    return _column_scales_of(maxima, alpha)


def _column_scales_of(maxima: torch.Tensor, alpha: float) -> torch.Tensor:
    """``column_scales`` from blocks' column maxima of |w| (blocks, in)."""
    colmax = maxima.amax(dim=0)  # a maximum: the same in any order
    colmax = colmax.clamp(min=max(float(colmax.max()) * 1e-4, 1e-30))
    c = colmax**alpha
    return (c / c.mean()).clamp(2**-6, FP8_MAX).to(torch.float8_e4m3fn)


def choose_column_scale(w: torch.Tensor, fmt: IntFormat, group_size: int | None) -> Quantized:
    """RTN with column scales when they lower the reconstruction error of ``w``, else plain RTN.

    The same as comparing ``quantize_rtn`` with and without ``column_scales(w)`` by the float32 sum
    of each one's squared errors over the whole (out, in) tensor (one ``sum`` call each), in four
    passes over blocks of rows and one (out, in) float32 buffer: it holds ``w / c`` until rounding
    turns it, block by block, into the scaled version's squared errors, then the plain version's."""
    w2 = rows(w)
    r = _Rounder(w2, fmt, group_size)
    maxima = torch.empty(len(r.blocks), r.n)
    plain, scaled = r.extremes(), r.extremes()

    def scan(i: int, b: slice) -> None:  # |w|: column maxima, and the plain version's group extremes
        a = w2[b].abs()
        maxima[i] = a.amax(dim=0)
        plain.note(b, r.grouped(w2[b]), r.grouped(a))

    r.each(scan)
    cs = _column_scales_of(maxima, COLUMN_SCALE_ALPHA)
    c = cs.float()
    buf = torch.empty(r.out, r.n)  # (out, in)

    def divide(_: int, b: slice) -> None:
        torch.div(w2[b], c, out=buf[b])
        scaled.note(b, r.grouped(buf[b]))

    r.each(divide)
    s_scale, s_zp = scaled.params()
    s_q = torch.empty(r.out, r.n, dtype=torch.int8)
    r.round(buf, s_scale, s_zp, s_q, _Error(buf, c))
    err_scaled = float(buf.sum())
    p_scale, p_zp = plain.params()
    p_q = torch.empty(r.out, r.n, dtype=torch.int8)
    r.round(w2, p_scale, p_zp, p_q, _Error(buf, None))
    err_plain = float(buf.sum())
    if err_scaled < err_plain:
        return Quantized(q=s_q, scale=s_scale, zero_point=s_zp, column_scale=cs)
    return Quantized(q=p_q, scale=p_scale, zero_point=p_zp)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    column_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(out, in) integers -> (out, in) floats, groups of ``in / scale.shape[1]`` columns, times
    ``column_scale`` (in,) when given."""
    out, n = q.shape
    groups = scale.shape[-1] if scale.dim() == 2 else 1
    s = scale.reshape(out, groups, 1).to(dtype)
    z = None if zero_point is None else zero_point.reshape(out, groups, 1).to(dtype)
    c = None if column_scale is None else column_scale.to(dtype)
    w = torch.empty(out, n, dtype=dtype)

    def block(_: int, b: slice) -> None:  # in blocks of rows, the same operations in order
        wb = w[b].view(b.stop - b.start, groups, n // groups)
        wb.copy_(q[b].reshape(wb.shape))
        if z is not None:
            wb.sub_(z[b])
        wb.mul_(s[b])
        if c is not None:
            w[b].mul_(c)

    _each(block, _row_blocks(out, n))
    return w


# --------------------------------------------------------------------------------- int4 packing


def pack_int4(q: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """(out, in) int4 values -> (out, in / 2) uint8, two per byte: column 2j in the low nibble,
    2j + 1 in the high nibble. Symmetric values [-8, 7] are stored offset by 8 as [0, 15]."""
    u = q.to(torch.int8).view(torch.uint8)  # the same bits
    if symmetric:
        u = u + 8  # uint8 arithmetic wraps: [-8, 7] -> [0, 15]
    return (u[:, 1::2] << 4).bitwise_or_(u[:, 0::2])  # (out, in / 2), contiguous


def unpack_int4(packed: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``: (out, in / 2) uint8 -> (out, in) int8."""
    lo = (packed & 0x0F).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    q = torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)
    return q - 8 if symmetric else q


# Packing and unpacking go a block of rows at a time (about this many values): their int64
# temporaries stay a few MB, where a whole 32000 x 2048 lm_head's took over a GB.
PACK_VALUES = 1 << 20


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned values < 2**bits -> (rows, ceil(cols * bits / 32)) int32, 32 / bits
    values a word, value j of a row at bit (j mod 32/bits) * bits of word j div (32/bits): the
    dense packing of compressed-tensors' ``pack-quantized`` (bits 4 or 8)."""
    per = 32 // bits
    rows, cols = u.shape
    pad = (-cols) % per
    shifts = torch.arange(per, dtype=torch.int64) * bits
    out = torch.empty(rows, (cols + pad) // per, dtype=torch.int32)
    step = max(1, PACK_VALUES // max(cols, 1))
    for i in range(0, rows, step):
        v = F.pad(u[i : i + step].to(torch.int64), (0, pad)).reshape(-1, (cols + pad) // per, per)
        words = (v << shifts).sum(-1)  # in [0, 2**32)
        out[i : i + step] = torch.where(words >= 2**31, words - 2**32, words)
    return out


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: (rows, words) int32 -> (rows, cols) int16 unsigned values."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    out = torch.empty(words.shape[0], cols, dtype=torch.int16)
    step = max(1, PACK_VALUES // max(words.shape[1] * per, 1))
    for i in range(0, words.shape[0], step):
        w = words[i : i + step].to(torch.int64) & 0xFFFFFFFF
        v = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        out[i : i + step] = v.reshape(w.shape[0], -1)[:, :cols]
    return out


# ----------------------------------------------------------------------------------------- fp8


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 with one float32 scale per output channel: q = fp8(w / s), s = max|w_row| / 448.
    Returns q (out, in) float8_e4m3fn and s (out, 1) float32."""
    w2 = rows(w)
    scale = (w2.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    q = (w2 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)
