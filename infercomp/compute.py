"""Compute modes: how a loaded model runs on this CPU, chosen apart from how its weights are stored.

| mode | what runs |
|------|-----------|
| fp32 | weights decoded once to float32; float32 matmuls and convolutions |
| bf16 | weights decoded once to bfloat16 and the whole module run in bfloat16 (oneDNN uses AMX or AVX-512 BF16 where the CPU has them); float inputs are cast on entry, outputs back to float32 |
| int8 | Linear layers above ``SMALL_LAYER`` weights (64 Ki: below it the per-call work of quantizing activations costs more than the matmul) run int8 x int8 with activations quantized per row (token) at each call (``kernels``); the rest runs in float32 or bfloat16, whichever the trial measures faster |
| auto | the modes the storage allows (``allowed_modes``) are each applied to a copy of the model and timed on an example input; the fastest wins, float32 unless another is measurably faster. The choice is cached on disk per CPU, torch version, threads, model and input shape |

Within int8, each layer shape picks the fastest of its float path and the int8 kernels by a
short trial of its own (``kernels.choose``), so a layer too small to gain stays float.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from infercomp.errors import UsageError
from infercomp.formats.qmodules import SMALL_LAYER
from infercomp.kernels import Int8Linear, Int8Weight, KernelCache, cpu_features, int8_exact_ok, onednn_bf16_ok
from infercomp.timing import summarise, time_interleaved

MODES = ("auto", "fp32", "bf16", "int8")
# auto takes another mode only when its median is below this fraction of float32's: a tie within
# the noise of a short trial keeps the exact path.
MARGIN = 0.95
# Storage precisions (formats / dtypes) whose own rounding error is at least bfloat16's: a model
# holding such weights may run in bf16 under auto without losing what its storage promises.
_LOW_PRECISION = {"bfloat16", "float16", "int8", "int8-dynamic", "int4", "fp8"}


@dataclass
class ComputeInfo:
    """What a loaded model runs, for the report.

    Attributes:
        requested: the mode asked for (``auto``, ``fp32``, ``bf16``, ``int8``).
        mode: the mode that runs (never ``auto``); ``int8`` may carry ``+bf16`` (the rest in bf16).
        features: the CPU's matrix features (``amx_bf16``, ``avx512_vnni``...).
        kernels: module name -> kernel that runs it (Linear / conv layers).
        trial_ms: auto / int8: median milliseconds of each candidate in the trial (None: no trial).
        cached: the choice came from the on-disk cache (no trial ran now).
        note: why a mode was not available, or None.
        compiled: the module runs under ``torch.compile`` (``--compile``).
    """

    requested: str
    mode: str
    features: list[str] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)
    trial_ms: dict[str, float] | None = None
    cached: bool = False
    note: str | None = None
    compiled: bool = False


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError(f"--compute {mode!r} is not supported; choose one of: {', '.join(MODES)}")


def allowed_modes(precisions: set[str]) -> tuple[str, ...]:
    """The modes ``auto`` may pick for a model whose weights are stored as ``precisions``
    (dtype names and format names): bf16 when some weight is stored at bf16's precision or
    below, int8 only when the storage already quantizes activations (``int8-dynamic``). A plain
    float32 model stays float32 under auto; ask for ``--compute bf16`` to trade its exactness."""
    modes = ["fp32"]
    if precisions & _LOW_PRECISION:
        modes.append("bf16")
    if "int8-dynamic" in precisions:
        modes.append("int8")
    return tuple(modes)


def prepare(
    module: nn.Module,
    mode: str,
    *,
    example: Any = None,
    allowed: tuple[str, ...] = ("fp32", "bf16", "int8"),
    int8_weights: dict[str, Int8Weight] | None = None,
    cache: KernelCache | None = None,
) -> tuple[nn.Module, ComputeInfo]:
    """Make a float32 ``module`` (weights decoded, eval mode, on the CPU) run as ``mode``.

    Args:
        module: the model, changed in place and returned (the trial times copies of it).
        mode: one of ``MODES``.
        example: an input batch (tensor) for the trials; without one, ``auto`` keeps fp32 and
            int8 runs its rest in float32.
        allowed: the modes ``auto`` may choose (``allowed_modes``).
        int8_weights: module name -> stored per-channel int8 weights to use as they are in int8
            mode (int8 checkpoints), instead of quantizing the float weights again.
        cache: where trial results are kept (default ``~/.cache/infercomp``).

    Returns:
        (the module to run, what runs).
    """
    check_mode(mode)
    cache = cache if cache is not None else KernelCache()
    info = ComputeInfo(requested=mode, mode=mode, features=cpu_features())
    if mode == "fp32":
        pass
    elif mode == "bf16":
        to_bf16(module)
        if not onednn_bf16_ok():
            info.note = "this CPU (or ONEDNN_MAX_CPU_ISA) has no native bf16 kernels: bf16 runs emulated, usually slower than fp32"
    else:
        variants = _native([*allowed] if mode == "auto" else ["int8"], mode)
        if example is None:
            info.note = "no example input to time the candidates on: " + ("kept fp32" if mode == "auto" else "the rest runs in float32")
            module = _apply(module, "fp32" if mode == "auto" else "int8", int8_weights, cache)
            info.mode = "fp32" if mode == "auto" else "int8"
        else:
            baseline = "fp32" if mode == "auto" else "int8"
            try:
                choice, info.trial_ms, info.cached = _trial(module, variants, baseline, example, int8_weights, cache)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:  # the model cannot run this example
                choice = baseline
                info.note = f"the example input did not run ({type(e).__name__}), so nothing was timed: kept {baseline}"
            module = _apply(module, choice, int8_weights, cache)
            info.mode = choice
    info.kernels = _kernels(module, example)
    return module, info


def _native(modes: list[str], requested: str) -> list[str]:
    """The trial's variants: only those this CPU runs natively (without AVX-512 BF16 / AMX oneDNN
    emulates bf16, and without VNNI / AMX its int8 path accumulates inexactly and ran slower than
    fp32 in bench/bench_kernels.py),
    so a trial never spends minutes on a path that cannot win. ``int8`` splits into int8 with
    the rest in fp32 and in bf16."""
    out = [m for m in modes if m == "fp32" or (m == "bf16" and onednn_bf16_ok())]
    if "int8" in modes:
        out += ["int8"] if requested == "int8" or int8_exact_ok() else []
        out += ["int8+bf16"] if onednn_bf16_ok() and (requested == "int8" or int8_exact_ok()) else []
    return out or ["fp32"]


def _apply(module: nn.Module, mode: str, int8_weights: dict[str, Int8Weight] | None, cache: KernelCache | None = None) -> nn.Module:
    """``module`` (float32) made to run as ``mode`` (fp32, bf16, int8, int8+bf16), in place."""
    if mode.startswith("int8"):
        to_int8(module, int8_weights, cache)
    if mode in ("bf16", "int8+bf16"):
        to_bf16(module)
    return module


def to_bf16(module: nn.Module) -> None:
    """Cast every float parameter and buffer to bfloat16; cast float inputs on entry and float
    outputs back to float32 on exit, so callers see the same types as before."""
    module.to(torch.bfloat16)
    if getattr(module, "_infercomp_casts", False):
        return
    module.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
    module.register_forward_hook(_cast_output)
    module._infercomp_casts = True


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):  # dicts and transformers' ModelOutput (a dict subclass)
        for k in list(value.keys()):
            value[k] = _cast(value[k], dtype)
        return value
    return value


def _cast_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    del module
    return _cast(args, torch.bfloat16), {k: _cast(v, torch.bfloat16) for k, v in kwargs.items()}


def _cast_output(module: nn.Module, args: Any, output: Any) -> Any:
    del module, args
    return _cast(output, torch.float32)


def to_int8(module: nn.Module, int8_weights: dict[str, Int8Weight] | None = None, cache: KernelCache | None = None) -> None:
    """Replace each ``nn.Linear`` above ``SMALL_LAYER`` weights by an ``Int8Linear`` (per-channel
    int8 weights, activations quantized per row at each call), in place."""
    int8_weights = int8_weights or {}
    for name, child in list(module.named_modules()):
        if type(child) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
            continue
        if child.in_features * child.out_features <= SMALL_LAYER:
            continue
        bias = None if child.bias is None else child.bias.detach()
        weight = int8_weights.get(name)
        weight = Int8Weight(weight.wq, weight.scale, bias) if weight is not None else Int8Weight.from_float(child.weight.detach(), bias)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, Int8Linear(weight, cache=cache))


def _trial(
    module: nn.Module,
    variants: list[str],
    baseline: str,
    example: Any,
    int8_weights: dict[str, Int8Weight] | None,
    cache: KernelCache,
) -> tuple[str, dict[str, float], bool]:
    """Time each variant of ``module`` on ``example`` (interleaved, after warm-up); returns
    (the choice, median ms per variant, whether it came from the cache)."""
    if len(variants) == 1:
        return variants[0], {}, False
    key = ("model", signature(module), _shape_of(example), tuple(variants))
    hit = cache.get(key)
    if hit is not None and hit["choice"] in variants:
        return hit["choice"], dict(hit.get("timings_ms") or {}), True
    copies = {v: _apply(copy.deepcopy(module), v, int8_weights, cache) for v in variants}

    def call(m: nn.Module) -> Any:
        def fn() -> Any:
            with torch.inference_mode():
                return m(example)

        return fn

    times = time_interleaved([call(copies[v]) for v in variants], device=torch.device("cpu"), warmup=2, min_time=0.2, min_runs=5)
    medians = {v: summarise(t)["median"] for v, t in zip(variants, times)}
    best = min(variants, key=lambda v: medians[v])
    if best != baseline and medians[best] >= MARGIN * medians[baseline]:
        best = baseline
    medians = {v: round(ms, 4) for v, ms in medians.items()}
    cache.put(key, {"choice": best, "timings_ms": medians})
    return best, medians, False


def signature(module: nn.Module) -> str:
    """A stable fingerprint of a module's structure (class names, parameter names, shapes and
    dtypes): the cache key of a trial, so another model never reuses its result."""
    h = hashlib.sha256()
    for name, m in module.named_modules():
        h.update(f"{name}:{type(m).__name__};".encode())
    for name, p in module.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def _shape_of(example: Any) -> str:
    if torch.is_tensor(example):
        return f"{tuple(example.shape)}:{example.dtype}"
    return json.dumps(repr(example))[:200]


def _kernels(module: nn.Module, example: Any) -> dict[str, str]:
    """Module name -> what runs it, for the Linear and convolution layers. Int8 layers choose
    per shape on their first call: the example runs once first so that they have chosen."""
    if example is not None and any(isinstance(m, Int8Linear) for m in module.modules()):
        with torch.inference_mode():
            module(example)
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, Int8Linear):
            out[name] = m.kernel_name()
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(getattr(m, "weight", None), torch.Tensor):
            kind = "linear" if isinstance(m, nn.Linear) else type(m).__name__.lower()
            out[name] = f"{str(m.weight.dtype).removeprefix('torch.').replace('float32', 'fp32').replace('bfloat16', 'bf16')} {kind}"
    return out
