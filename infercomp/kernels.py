"""CPU kernels: what this CPU offers, int8 x int8 Linear kernels with per-row (per-token)
activation scales, and a chooser that picks the fastest kernel per shape by timing it once and
remembering the answer on disk.

Base layer: imports torch and the stdlib only.

- ``cpu_features()``, ``cpu_model()``, ``isa_limit()``: the CPU's matrix features (AMX, AVX-512
  BF16 / VNNI), its name, and ``ONEDNN_MAX_CPU_ISA`` (which caps oneDNN's kernels);
  ``onednn_bf16_ok()`` / ``int8_exact_ok()``: whether bf16 / int8 kernels are native here.
- ``Int8Weight``: per-channel int8 weights (prepacked for oneDNN on first use).
- ``INT8_KERNELS``: ``int8_onednn`` (oneDNN ``qlinear_pointwise`` on uint8 activations; the
  per-row scales, and per-row zero points for skewed rows, applied after the GEMM) and
  ``int8_intmm`` (``torch._int_mm``).
- ``KernelCache`` / ``choose``: fastest candidate per key; the float path is always a candidate
  and wins unless another is measured faster.
- ``Int8Linear``: ``nn.Linear`` replacement that chooses per (rows, in, out, dtype).

``bench/bench_kernels.py`` prints these kernels against float32 and bf16 on the machine it runs
on, with the int8 time split into quantize / GEMM / rescale: on this project's AMX Xeon, at
thousands of rows quantizing the activations (an elementwise pass) costs as much as the int8 GEMM
itself, so bf16 wins there; at 16 rows and fewer the weight bytes dominate and int8 wins.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import infercomp.allocator as allocator

__all__ = [
    "INT8_KERNELS",
    "Int8Linear",
    "Int8Weight",
    "KernelCache",
    "choose",
    "cpu_features",
    "cpu_model",
    "int8_exact_ok",
    "isa_limit",
    "linear_float",
    "linear_int8_intmm",
    "linear_int8_onednn",
    "onednn_bf16_ok",
    "quantize_rows",
    "quantize_weight",
]

_ISA_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni")


# --------------------------------------------------------------------------- CPU description
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # non-Linux or sandboxed: degrade to "unknown" rather than fail
        return ""


def cpu_features() -> list[str]:
    """Return the GEMM-relevant ISA flags of this CPU (subset of ``_ISA_FLAGS``), sorted."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return sorted(f for f in _ISA_FLAGS if f in flags)
    return []


def cpu_model() -> str:
    """Return the ``model name`` line of /proc/cpuinfo (falls back to ``platform.processor()``)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def isa_limit() -> str | None:
    """Return ``ONEDNN_MAX_CPU_ISA`` if set: it caps oneDNN's kernels (e.g. no AMX) and so
    changes which kernel is fastest even on the same CPU."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or None


# oneDNN ISA names in increasing order (ONEDNN_MAX_CPU_ISA values) up to the first with bf16
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16")


def onednn_bf16_ok() -> bool:
    """True if oneDNN may use native bf16 kernels: the CPU has avx512_bf16 and
    ONEDNN_MAX_CPU_ISA (if set) does not cap below AVX512_CORE_BF16 (AMX/FP16/AVX10 names rank
    above it; unknown names count as capped, the safe side)."""
    if "avx512_bf16" not in cpu_features():
        return False
    cap = (isa_limit() or "").upper()
    if not cap or cap in ("ALL", "DEFAULT"):
        return True
    if cap in _ONEDNN_ISAS:
        return cap == "AVX512_CORE_BF16"
    return cap.startswith(("AVX512_CORE_AMX", "AVX512_CORE_FP16", "AVX10"))


def int8_exact_ok() -> bool:
    """True if oneDNN's int8 GEMM accumulates exactly: needs VNNI (or AMX). Below it (e.g.
    ONEDNN_MAX_CPU_ISA=AVX2) u8*s8 pairs are summed with int16 saturation (vpmaddubsw):
    measured SQNR fell from 33 to 23 dB, cosine 0.9755 - int8 must not be offered there."""
    feats = set(cpu_features())
    if not {"avx512_vnni", "amx_int8", "avx_vnni"} & feats:
        return False
    cap = (isa_limit() or "").upper()
    if cap in ("SSE41", "AVX", "AVX2", "AVX512_CORE"):
        return False
    if cap.startswith("AVX2_VNNI"):
        return "avx_vnni" in feats
    return True


# --------------------------------------------------------------------------- quantisation
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w (N, K) ~= wq * scale[:, None]``.

    Returns ``(wq int8 (N, K), scale float32 (N,))``.
    """
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    wq = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return wq.contiguous(), scale


def quantize_rows(
    x: torch.Tensor, buf: torch.Tensor | None = None, qbuf: torch.Tensor | None = None, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row 8-bit quantisation of a 2-D float32/bfloat16 tensor.

    Returns ``(xq (M, K), scale float32 (M, 1))`` with ``x ~= xq * scale`` (int8), or, with
    ``unsigned=True``, ``x ~= (xq - 128) * scale`` (uint8, zero point 128: the layout oneDNN's
    VNNI/AVX2 int8 kernels need - s8 activations fall back to a reference kernel there).
    ``buf`` ((M, K), float32 or bfloat16 - the dtype the rounding is done in) and ``qbuf``
    ((M, K) int8/uint8) are optional scratch tensors: reusing them avoids fresh multi-MB
    allocations whose page faults cost as much as the GEMM. A bfloat16 ``buf`` halves the bytes
    moved for bfloat16 inputs.
    """
    # amax and amin are two cheap reads; x.abs() would allocate a full copy and aminmax() is
    # measurably slower than the pair on torch 2.13 CPU.
    amax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg())
    amax = amax.float().clamp_min_(1e-12)
    M, K = x.shape
    if buf is None:
        buf = torch.empty((M, K), dtype=torch.float32)
    if qbuf is None:
        qbuf = torch.empty((M, K), dtype=torch.uint8 if unsigned else torch.int8)
    inv = (127.0 / amax).to(buf.dtype)
    if unsigned and buf.dtype == torch.float32:
        # y + 128.5 lies in [1.5, 255.5]; the float->uint8 copy truncates, i.e. floors positive
        # values, so floor(y + 128.5) = round-half-up(y) + 128 and the round_() pass is saved.
        torch.addcmul(_OFFSET_128_5, x, inv, out=buf)  # mixed dtype: bf16 x read once
        qbuf.copy_(buf)
        return qbuf, amax.mul_(1.0 / 127.0)
    if unsigned:
        torch.addcmul(_OFFSET_128, x, inv, out=buf)  # round(y + 128) == round(y) + 128
    else:
        torch.mul(x, inv, out=buf)
    buf.round_()
    if buf.dtype != torch.float32:
        # bf16 has 8 mantissa bits: products can round past the range and would wrap
        buf.clamp_(1.0, 255.0) if unsigned else buf.clamp_(-127.0, 127.0)
    qbuf.copy_(buf)
    return qbuf, amax.mul_(1.0 / 127.0)


_OFFSET_128 = torch.tensor(128.0)
_OFFSET_128_5 = torch.tensor(128.5)


def _quantize_scratch(x2: torch.Tensor, bf16_math: bool, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x2.shape
    math = torch.bfloat16 if (bf16_math and x2.dtype == torch.bfloat16) else torch.float32
    qdt = torch.uint8 if unsigned else torch.int8
    return quantize_rows(x2, _SCRATCH.get((M, K), math), _SCRATCH.get((M, K), qdt), unsigned)


class _Scratch:
    """Per-shape reusable buffers (single-threaded inference: one set per shape is enough)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        t = self._bufs.get(key)
        if t is None:
            if len(self._bufs) > 16:  # bound memory when many distinct M values pass through
                self._bufs.clear()
            # Made outside inference mode: an inference tensor could not be written to later by a
            # call made under no_grad or plain autograd.
            with torch.inference_mode(False):
                t = self._bufs[key] = torch.empty(shape, dtype=dtype)
        return t


_SCRATCH = _Scratch()


# --------------------------------------------------------------------------- int8 weights
class Int8Weight:
    """An int8 weight ``(N, K)`` with float32 per-channel scales, an optional bias, and
    backend layouts built on first use (prepacking for oneDNN is done once, not per call)."""

    def __init__(self, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        assert wq.dtype == torch.int8 and wq.dim() == 2
        self.wq = wq.contiguous()
        self.scale = scale.float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.N, self.K = self.wq.shape
        self._packed: torch.Tensor | None = None
        self._zp = torch.zeros(self.N, dtype=torch.int64)
        self._bias_bf16: torch.Tensor | None = None
        self._float: dict[Any, torch.Tensor] = {}  # dequantized copies by dtype, row sums by ("qsum", dtype)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Weight:
        """Quantise a float weight (N, K) per output channel."""
        wq, s = quantize_weight(w)
        return cls(wq, s, bias)

    def packed(self, m_hint: int | None = None) -> torch.Tensor:
        """oneDNN-prepacked weight; an M hint lets oneDNN pick a blocked layout that is
        faster at large M (it only matters for the first call, later calls reuse it)."""
        if self._packed is None:
            shape = None if m_hint is None else [m_hint, self.K]
            self._packed = torch.ops.onednn.qlinear_prepack(self.wq, shape)
        return self._packed

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The bias in ``dtype`` (cached), or None."""
        if self.bias is None or dtype == torch.float32:
            return self.bias
        if self._bias_bf16 is None:
            self._bias_bf16 = self.bias.to(dtype)
        return self._bias_bf16

    def qsum_scaled(self, dtype: torch.dtype) -> torch.Tensor:
        """``rowsum(wq) * scale`` as (1, N) in ``dtype`` (cached): what a per-row activation zero
        point subtracts from the output."""
        key = ("qsum", dtype)
        if key not in self._float:
            self._float[key] = (self.wq.sum(dim=1, dtype=torch.int32).float() * self.scale).reshape(1, -1).to(dtype)
        return self._float[key]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float copy ``wq * scale`` (used by the float fallback candidates)."""
        if dtype not in self._float:
            self._float[dtype] = (self.wq.float() * self.scale[:, None]).to(dtype)
        return self._float[dtype]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def _finish(y2d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y2d.reshape(*x.shape[:-1], y2d.shape[-1]) if x.dim() != 2 else y2d


# --------------------------------------------------------------------------- int8 kernels
def linear_int8_onednn(x: torch.Tensor, w: Int8Weight, *, bf16_math: bool = False) -> torch.Tensor:
    """int8 dynamic Linear via oneDNN ``qlinear_pointwise`` with **per-row** activation scales.

    oneDNN's op only accepts a per-tensor activation scale (a (M,) tensor is rejected with
    "act scale/zp size should be 1"), but the int32 accumulator is linear in it, so we pass
    ``x_scale=1`` with the per-channel weight scales, let oneDNN emit ``acc * w_scale`` in the
    output dtype, and apply row scale + bias in one in-place ``addcmul`` pass. Activations are
    fed as uint8 with zero point 128: as fast as s8 with AMX and the only fast form without
    AMX (s8 x s8 activations fell back to a reference kernel under ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI).
    Output dtype = input dtype (float32 or bfloat16). ``bf16_math=True`` quantises bf16 inputs
    in bf16 arithmetic: half the bytes per pass but 4 passes instead of 2 and ~1 dB lower SQNR;
    measured slower, kept for comparison.
    """
    x2 = _rows(x)
    # bf16 output from qlinear needs AVX512_BF16: below that oneDNN uses a reference kernel
    # (seconds per call under ONEDNN_MAX_CPU_ISA=AVX2), so emit fp32 and cast in the
    # rescale pass instead (same pass count).
    odt = x.dtype if (x.dtype == torch.float32 or onednn_bf16_ok()) else torch.float32
    skewed = _skewed_rows(x2)
    if skewed is None:
        xq, xs = _quantize_scratch(x2, bf16_math, unsigned=True)
        zp = None
    else:
        xq, xs, zp = _quantize_rows_skewed(x2, *skewed)
    y = torch.ops.onednn.qlinear_pointwise(
        xq, 1.0, 128 if zp is None else 0, w.packed(x2.shape[0]), w.scale, w._zp, None, 1.0, 0, odt, "none", [], ""
    )
    if zp is not None:  # y = (acc - zp * rowsum(Wq)) * ws: the per-row zero points, one rank-1 pass
        y.addcmul_(zp.neg().to(odt), w.qsum_scaled(odt))
    out = y if odt == x.dtype else torch.empty(y.shape, dtype=x.dtype)
    b = w.bias_as(odt)
    xs = xs.to(odt)
    if b is None:
        torch.mul(y, xs, out=out)
    else:
        torch.addcmul(b, y, xs, out=out)  # out = b + (acc*ws) * xs, one pass
    return _finish(out, x)


def _skewed_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row minima, row maxima) as float32 (M, 1) when some row is skewed (its midpoint off zero
    by more than a quarter of its range, e.g. GELU outputs): symmetric scales would leave about
    half of such a row's 255 levels unused. None when no row is."""
    lo, hi = x2.amin(dim=1, keepdim=True).float(), x2.amax(dim=1, keepdim=True).float()
    return (lo, hi) if bool(((hi + lo).abs() > 0.5 * (hi - lo)).any()) else None


def _quantize_rows_skewed(x2: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row uint8: ``x ~= (xq - zp) * scale`` with a scale and a whole-number zero
    point per row, so every row uses its full range. Returns (xq uint8 (M, K), scale (M, 1),
    zp (M, 1)) float32."""
    m, k = x2.shape
    # 254 steps (not 255): x / scale + zp then lies in [-0.5, 254.5], so adding 0.5 and
    # truncating to uint8 rounds without a clamp pass (a value just below 0 truncates to 0).
    scale = ((hi - lo) / 254).clamp_min_(1e-12)
    inv = 1.0 / scale
    zp = torch.round(-lo * inv)
    buf = _SCRATCH.get((m, k), torch.float32)
    torch.addcmul(zp + 0.5, x2, inv, out=buf)
    qbuf = _SCRATCH.get((m, k), torch.uint8)
    qbuf.copy_(buf)
    return qbuf, scale, zp


_INT_MM_MIN_M = [0]  # raised to 17 the first time a torch build rejects M <= 16


def linear_int8_intmm(x: torch.Tensor, w: Int8Weight, *, bf16_math: bool = False, min_m: int | None = None) -> torch.Tensor:
    """int8 dynamic Linear via ``torch._int_mm`` (int32 out) + fused rescale.

    Some CPU builds of ``_int_mm`` require M > 16 (torch 2.13 here accepts any M): small M is
    zero-padded to ``min_m`` rows when the build rejects it (remembered process-wide) or when
    ``min_m`` is given (tests use it to exercise the padding path).
    """
    x2 = _rows(x)
    M, K = x2.shape
    floor = _INT_MM_MIN_M[0] if min_m is None else min_m
    Mp = max(M, floor)
    if Mp != M:
        x2 = torch.cat([x2, x2.new_zeros(Mp - M, K)])
    xq, xs = _quantize_scratch(x2, bf16_math)
    # wq.t() is a transposed view of the (N, K) weight: measured 1.5-2x faster than a
    # contiguous (K, N) copy (it is oneDNN's native "NT" layout).
    try:
        acc = torch._int_mm(xq, w.wq.t())
    except RuntimeError:
        if Mp > 16:
            raise
        _INT_MM_MIN_M[0] = 17
        return linear_int8_intmm(x, w, bf16_math=bf16_math, min_m=17)
    y = torch.mul(acc, xs)  # int32 * fp32 row scale -> fp32, one pass
    out = y if x.dtype == torch.float32 else torch.empty(y.shape, dtype=x.dtype)
    if w.bias is None:
        torch.mul(y, w.scale, out=out)
    else:
        torch.addcmul(w.bias, y, w.scale, out=out)
    return _finish(out[:M] if Mp != M else out, x)


def linear_float(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """Float fallback in the input dtype with the dequantised weight (the chooser's baseline)."""
    return F.linear(x, w.dequantized(x.dtype), w.bias_as(x.dtype))


#: int8 kernels with per-row activation scales that are accurate enough to be chosen.
INT8_KERNELS: dict[str, Callable[[torch.Tensor, Int8Weight], torch.Tensor]] = {
    "int8_onednn": linear_int8_onednn,
    "int8_intmm": linear_int8_intmm,
}


# --------------------------------------------------------------------------- kernel cache
def _default_cache_path() -> Path:
    d = os.environ.get("INFERCOMP_CACHE_DIR")
    base = Path(d) if d else Path.home() / ".cache" / "infercomp"
    return base / "kernels.json"


class KernelCache:
    """On-disk JSON map ``context|key -> {"choice": name, "timings_ms": {...}}``.

    The context (CPU model + features, ONEDNN_MAX_CPU_ISA, torch version, threads, allocator) is part of
    every key, so a cache copied to another machine or run with another ISA cap is not reused.
    An unreadable/corrupt file is treated as empty and rewritten; writes are atomic (temp file
    + ``os.replace``) and silently skipped if the directory is not writable.
    """

    def __init__(self, path: os.PathLike | str | None = None) -> None:
        self.path = Path(path) if path is not None else _default_cache_path()
        self._data: dict[str, Any] | None = None

    @staticmethod
    def context() -> str:
        parts = [cpu_model(), ",".join(cpu_features()), isa_limit() or "-", torch.__version__, f"t{torch.get_num_threads()}"]
        return "|".join([*parts, allocator.state()])  # the allocator moves float timings (infercomp.allocator)

    def full_key(self, key: tuple) -> str:
        return self.context() + "|" + json.dumps(list(key), default=str)

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            try:
                data = json.loads(self.path.read_text())
                self._data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, key: tuple) -> dict[str, Any] | None:
        entry = self._load().get(self.full_key(key))
        return entry if isinstance(entry, dict) and isinstance(entry.get("choice"), str) else None

    def put(self, key: tuple, entry: dict[str, Any]) -> bool:
        """Store and persist an entry; returns False (no exception) if it could not be written."""
        data = self._load()
        data[self.full_key(key)] = entry
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kernels.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            return True
        except OSError:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False


# --------------------------------------------------------------------------- chooser
def measure(
    candidates: Mapping[str, Callable[[], Any]],
    budget_s: float = 0.08,
    min_rounds: int = 3,
    max_rounds: int = 15,
    baseline: str | None = None,
    slow_factor: float = 8.0,
) -> dict[str, float]:
    """Median seconds per candidate: one untimed warm-up call each (one-time costs such as
    prepacking), then interleaved rounds (drift and noise hit all candidates alike) until
    ``budget_s`` is spent (at least ``min_rounds``). A candidate more than ``slow_factor`` x
    slower than ``baseline`` in the first round is dropped (its first time is reported): some
    kernels hit reference code paths on CPUs without AMX/VNNI and would eat the budget."""
    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    live = dict(candidates)
    start = time.perf_counter()
    for r in range(max_rounds):
        for name, fn in live.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if r == 0 and baseline in samples:
            limit = slow_factor * samples[baseline][0]
            live = {k: f for k, f in live.items() if samples[k][0] <= limit}
        if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in samples.items()}


def choose(
    candidates: Mapping[str, Callable[[], Any]],
    key: tuple,
    cache: KernelCache | None = None,
    *,
    baseline: str = "fp32",
    timings: Callable[[Mapping[str, Callable[[], Any]]], Mapping[str, float]] | None = None,
    budget_s: float = 0.08,
) -> str:
    """Return the name of the fastest candidate for ``key``, measuring only on a cache miss.

    ``candidates`` must contain ``baseline`` (the float path): another candidate is picked only
    if its measured median is strictly faster, so a kernel that is slow on this CPU (e.g. bf16
    or int8 without AMX/VNNI) can never be chosen over it. ``timings`` replaces the timer
    (tests inject a table); it gets the candidates and returns name -> seconds.
    """
    if baseline not in candidates:
        raise ValueError(f"candidates must include the baseline {baseline!r}")
    if cache is not None:
        hit = cache.get(key)
        if hit is not None and hit["choice"] in candidates:
            return hit["choice"]
    times = dict((timings or (lambda c: measure(c, budget_s, baseline=baseline)))(candidates))
    best = baseline
    for name, t in times.items():
        if name in candidates and t < times[best]:
            best = name
    if cache is not None:
        cache.put(key, {"choice": best, "timings_ms": {k: round(v * 1e3, 4) for k, v in times.items()}})
    return best


# --------------------------------------------------------------------------- module
def _short(dtype: str) -> str:
    return dtype.removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")


def _m_bucket(m: int) -> int:
    """Bucket the row count to a power of two so a ragged batch doesn't re-time every M."""
    return 1 << max(0, (m - 1).bit_length())


class Int8Linear(torch.nn.Module):
    """``nn.Linear`` replacement: int8 weights, per-token dynamic int8 activations.

    The int8 weight lives in ``self.w`` (an ``Int8Weight``, not registered buffers): this module
    runs a loaded model on the CPU and is not meant to be saved or moved (``infercomp`` saves
    checkpoints from their stored tensors, never from a runtime module). The kernels' scratch
    buffers are per process: one inference thread at a time.

    For each (M bucket, K, N, dtype) it chooses, by measuring once (cached on disk), between the
    float path (``F.linear`` with the dequantised weight, in the input dtype) and the int8
    kernels in ``INT8_KERNELS`` (only where ``int8_exact_ok()``). ``kernel`` forces one name instead.
    """

    def __init__(self, weight: Int8Weight, cache: KernelCache | None = None, kernel: str | None = None) -> None:
        super().__init__()
        self.w = weight
        self.in_features, self.out_features = weight.K, weight.N
        self.cache = cache
        self.kernel = kernel
        self._picked: dict[tuple, str] = {}

    @classmethod
    def from_linear(cls, lin: torch.nn.Linear, cache: KernelCache | None = None, kernel: str | None = None) -> Int8Linear:
        return cls(Int8Weight.from_float(lin.weight, lin.bias), cache, kernel)

    def _impl(self, name: str) -> Callable[[torch.Tensor, Int8Weight], torch.Tensor]:
        return linear_float if name in ("fp32", "float") else INT8_KERNELS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self._impl(self.kernel)(x, self.w)
        m = x.numel() // x.shape[-1]
        key = ("int8_linear", _m_bucket(m), self.in_features, self.out_features, str(x.dtype))
        name = self._picked.get(key)
        if name is None:
            probe = torch.randn(key[1], self.in_features).to(x.dtype)
            cands = {"fp32": lambda: linear_float(probe, self.w)}
            if int8_exact_ok():  # else int8 is inaccurate here, not only slow: never offer it
                for k, fn in INT8_KERNELS.items():
                    cands[k] = (lambda f: lambda: f(probe, self.w))(fn)
            name = self._picked[key] = choose(cands, key, self.cache)
            if name != "fp32":
                self.w._float.clear()  # don't keep a float weight copy that isn't used
        return self._impl(name)(x, self.w)

    def weight_bytes(self) -> int:
        """Bytes this layer's weights hold in memory: the int8 matrix, its scales and bias, and any
        float copy its float path keeps."""
        w = self.w
        parts = [w.wq, w.scale, *([] if w.bias is None else [w.bias]), *w._float.values()]
        return sum(t.numel() * t.element_size() for t in parts)

    def kernel_name(self) -> str:
        """The kernel(s) this layer ran (chosen per shape on first use), e.g. ``int8_onednn``."""
        if self.kernel is not None:
            return self.kernel
        names = sorted(
            {name if name != "fp32" else f"{_short(key[4])} linear (int8 weights dequantized)" for key, name in self._picked.items()}
        )
        return "+".join(names) if names else "int8 (not run yet)"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel_name()}"
