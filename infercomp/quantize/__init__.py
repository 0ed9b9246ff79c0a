"""Quantization: store and run weights in fewer bits.
``quantize(ckpt, QuantizeConfig(...), ctx) -> Checkpoint``.

Schemes (``SCHEMES``): ``int8``, ``int8-dynamic``, ``int4``, ``fp8`` (stored as the formats of
``infercomp.formats.quantized``, which documents each layout and how it runs) and ``fp16`` /
``bf16`` (every float tensor cast). This package chooses the integers (round to nearest, with
optional column scales, or GPTQ); the formats store them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

import infercomp.blocks as blocks
import infercomp.formats as formats
import infercomp.formats.grid as grid
import infercomp.hessian as hessian
from infercomp.checkpoint import Checkpoint
from infercomp.errors import UsageError
from infercomp.formats.base import Spec
from infercomp.formats.grid import IntFormat, Quantized
from infercomp.formats.qmodules import fp8_matmul_supported
from infercomp.formats.quantized import FP8, INT4, INT8, INT8_DYNAMIC
from infercomp.formats.sparse import BITMASK, BITMASK_24
from infercomp.patterns import selected, selected_weight
from infercomp.quantize import gptq
from infercomp.transform import Context, TransformConfig, choice

SCHEMES = ("int8", "int8-dynamic", "int4", "fp8", "fp16", "bf16")
METHODS = ("rtn", "gptq")
GROUP_SIZES = (32, 64, 128)
PER_CHANNEL = -1  # --group-size: one scale per output channel
DEFAULT_INT4_GROUP = 32
_INT_BITS = {"int8": 8, "int8-dynamic": 8, "int4": 4}
_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class QuantizeConfig(TransformConfig):
    """How to quantize.

    Attributes:
        scheme: see ``SCHEMES``.
        group_size: columns sharing one scale (32, 64, 128), or ``PER_CHANNEL`` (-1, as GPTQ
            tools write it) for one scale per output channel; None: per channel for int8,
            ``DEFAULT_INT4_GROUP`` for int4.
        asymmetric: int4 only: a zero point per group (range [0, 15]) instead of symmetric [-8, 7].
        method: ``rtn`` (round to nearest) or ``gptq`` (error-compensating; needs calibration data).
        calib_samples: calibration inputs GPTQ uses (the first ones of ``--data``).
        column_scales: int8 / int4 with RTN: None (default) gives a tensor column scales when they
            lower its reconstruction error (``grid.choose_column_scale``); True on every
            tensor; False never (plain compressed-tensors layout).
        include / exclude: glob patterns on module names.
    """

    transform: ClassVar[str] = "quantize"
    scheme: str = "int8"
    group_size: int | None = None
    asymmetric: bool = False
    method: str = "rtn"
    calib_samples: int = 128
    column_scales: bool | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        choice(self.scheme, SCHEMES, "--scheme")
        choice(self.method, METHODS, "--method")
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
                raise UsageError(f"group_size must be an integer, got {self.group_size!r}")
            if self.group_size not in (*GROUP_SIZES, PER_CHANNEL):
                choices = ", ".join(map(str, GROUP_SIZES))
                raise UsageError(
                    f"--group-size {self.group_size} is not supported; choose one of: {choices}, or {PER_CHANNEL} (per channel)"
                )
            if self.scheme not in ("int8", "int4"):
                how = (
                    "one scale per channel"
                    if self.scheme == "fp8"
                    else "no scales"
                    if self.scheme in ("bf16", "fp16")
                    else "scales per channel"
                )
                raise UsageError(f"--group-size applies to --scheme int8 and int4, not {self.scheme} ({how})")
        if self.asymmetric and self.scheme != "int4":
            raise UsageError(f"--asymmetric applies to --scheme int4 only, not {self.scheme}")
        if self.method == "gptq" and self.scheme not in ("int8", "int4"):
            raise UsageError(f"--method gptq applies to --scheme int8 and int4, not {self.scheme}")
        if self.column_scales is not None and not isinstance(self.column_scales, bool):
            raise UsageError(f"column_scales must be true, false or unset, got {self.column_scales!r}")
        if self.column_scales and (self.scheme not in ("int8", "int4") or self.method != "rtn"):
            raise UsageError(
                f"--column-scales applies to --scheme int8 and int4 with --method rtn, not --scheme {self.scheme} --method {self.method}"
            )
        if self.calib_samples < 1:
            raise UsageError(f"--calib-samples must be >= 1, got {self.calib_samples}")

    @property
    def groups(self) -> int | None:
        """Effective group size (None: per output channel)."""
        if self.group_size == PER_CHANNEL:
            return None
        if self.scheme == "int4" and self.group_size is None:
            return DEFAULT_INT4_GROUP
        return self.group_size

    @property
    def format(self) -> IntFormat:
        return IntFormat(_INT_BITS[self.scheme], symmetric=not self.asymmetric)


# ----------------------------------------------------------------------------------- transform


def quantize(ckpt: Checkpoint, config: QuantizeConfig, ctx: Context) -> Checkpoint:
    """Apply ``config`` to ``ckpt`` and return the quantized checkpoint (encoded tensors described
    in ``encodings``; everything not selected is kept as it was, decoded if it was encoded)."""
    dense = formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    if config.scheme in _CASTS:
        return _cast(ckpt, dense, config)
    chosen = quantized_weights(ckpt, dense, config, ctx)
    done: dict[str, Quantized] = {}
    if config.method == "gptq":
        done = gptq_integers(ckpt, dense, chosen, config, ctx)
    out: dict[str, torch.Tensor] = {}
    encs: dict[str, dict[str, Any]] = {}
    with ctx.progress.task(f"quantizing {len(chosen)} tensors to {config.scheme}", total=len(chosen)) as task:
        for name, t in dense.items():
            if name not in chosen:
                out[name] = t
                continue
            stored, encs[name] = quantize_tensor(name, t, config, done.get(name))
            out.update(stored)
            task.advance()
    note_scheme(config, ctx)
    return Checkpoint(tensors=out, model=ckpt.model, encodings=encs, plan=ckpt.plan)


def quantized_weights(ckpt: Checkpoint, dense: dict[str, torch.Tensor], config: QuantizeConfig, ctx: Context) -> dict[str, torch.Tensor]:
    """The weights ``config`` quantizes (int8 / int4 / fp8 schemes): selected, with rows that split
    into groups. Reads names and shapes only (``dense`` may hold meta tensors)."""
    chosen = {n: t for n, t in dense.items() if selected_weight(n, t, config.include, config.exclude)}
    return _check_groups(ckpt, chosen, config, ctx)


def quantize_tensor(
    name: str, t: torch.Tensor, config: QuantizeConfig, qz: Quantized | None = None
) -> tuple[dict[str, torch.Tensor], Spec]:
    """Stored tensors and spec of one weight: fp8, or the integers ``qz`` (from GPTQ) or, without
    them, round to nearest."""
    if config.scheme == "fp8":
        return FP8.encode(name, t)
    method = "rtn" if qz is None else "gptq"
    qz = qz or _rtn(t, config)
    return _INT_FORMATS[config.scheme].encode(name, qz, shape=t.shape, dtype=t.dtype, group_size=config.groups, method=method)


def note_scheme(config: QuantizeConfig, ctx: Context) -> None:
    if config.scheme == "fp8":
        how = (
            "torch._scaled_mm"
            if fp8_matmul_supported(ctx.device)
            else "dequantized to float on the fly (fp8 matmul needs a CUDA GPU of compute capability >= 8.9)"
        )
        ctx.progress.log(f"fp8: stored as float8_e4m3fn with per-channel scales; Linear layers on {ctx.device.type} run {how}")


def _rtn(t: torch.Tensor, config: QuantizeConfig) -> Quantized:
    if config.scheme not in ("int8", "int4") or config.column_scales is False:
        return grid.quantize_rtn(t, config.format, config.groups)
    if config.column_scales:
        return grid.quantize_rtn(t, config.format, config.groups, grid.column_scales(t))
    return grid.choose_column_scale(t, config.format, config.groups)


def _check_groups(ckpt: Checkpoint, chosen: dict[str, torch.Tensor], config: QuantizeConfig, ctx: Context) -> dict[str, torch.Tensor]:
    """Drop tensors that cannot take the scheme (noted): empty ones, rows that do not split into
    groups, rows of odd length for int4 (two values a byte); an error when the user named them
    with --include, or when nothing is left."""
    g = config.groups
    if not chosen:
        raise UsageError(f"{ckpt.name}: no weight matches --include/--exclude; nothing to quantize")
    keep, skipped = {}, []
    for name, t in chosen.items():
        n = t.numel() // t.shape[0] if t.numel() else 0
        fix = f"--exclude {name.rpartition('.')[0]}"
        if t.numel() == 0:
            why = f"tensor {name!r} is empty ({'x'.join(map(str, t.shape))})"
        elif g is not None and n % g:
            why = f"tensor {name!r} has rows of {n} values, not divisible by --group-size {g}"
            fix = f"choose a --group-size that divides {n} or {fix}"
        elif config.scheme == "int4" and n % 2:
            why = f"tensor {name!r} has rows of {n} values, an odd number: int4 stores two values a byte"
        else:
            keep[name] = t
            continue
        if config.include:
            raise UsageError(f"{ckpt.name}: {why}; {fix}")
        skipped.append(name)
        ctx.progress.log(f"{why}: left unquantized")
    if not keep:
        raise UsageError(f"{ckpt.name}: no weight can be quantized to {config.scheme} as asked (e.g. {why}); see the lines above")
    return keep


def gptq_integers(
    ckpt: Checkpoint,
    dense: dict[str, torch.Tensor],
    chosen: dict[str, torch.Tensor],
    config: QuantizeConfig,
    ctx: Context,
    *,
    on_done: Callable[[str, Quantized], None] | None = None,
) -> dict[str, Quantized]:
    """GPTQ for the Linear / Conv2d layers among ``chosen``; the others are left to RTN. Layers go in
    the model's order, each calibrated on inputs that passed the layers before it quantized; a
    Hugging Face causal LM goes one block at a time (``infercomp.blocks``: the same inputs, so the
    same integers, without building the whole model). ``on_done(name, integers)``: each weight's
    integers handed over as soon as they are chosen, instead of returned (a streamed run stores
    them at once: no layer's integers wait for the others)."""
    if ctx.data is None:
        raise UsageError("--method gptq needs calibration inputs: pass --data FILE (its first --calib-samples inputs are used)")
    if not ctx.loader.can_build(ckpt):
        raise UsageError(f"{ckpt.name}: --method gptq runs the model and needs its code: pass --model REF")
    calib = ctx.data.inputs[: config.calib_samples]
    done: dict[str, Quantized] = {}
    keep = on_done or done.__setitem__
    decoder = blocks.skeleton(ctx.loader.spec_for(ckpt), dense)
    if decoder is not None:
        targets = {n for n, m in decoder.model.named_modules() if f"{n}.weight" in chosen and hessian.supported(m)}

        def compress(stage: blocks.Stage) -> None:
            for n, m in stage.layers:
                _gptq_layer(n, m, stage.run, stage.batches, config=config, ctx=ctx, keep=keep)

        blocks.calibrate(decoder, dense, calib, targets, compress, batch_size=32, progress=ctx.progress)
        return done
    model = ctx.loader.build(Checkpoint(tensors=dense, model=ckpt.model, plan=ckpt.plan, path=ckpt.path), runtime=False).float()
    batches = [calib[i : i + 32] for i in range(0, len(calib), 32)]
    layers = [(n, m) for n, m in model.named_modules() if f"{n}.weight" in chosen and hessian.supported(m)]
    with ctx.progress.task(f"gptq on {len(calib)} calibration inputs", total=len(layers)) as task:
        for n, m in layers:
            _gptq_layer(n, m, model, batches, config=config, ctx=ctx, keep=keep)
            task.advance()
    return done


def _gptq_layer(
    name: str,
    m: nn.Module,
    run: Callable[[Any], Any],
    batches: Iterable[Any],
    *,
    config: QuantizeConfig,
    ctx: Context,
    keep: Callable[[str, Quantized], None],
) -> None:
    """GPTQ of layer ``name`` on the inputs that reach it while ``run(batch)`` runs each batch;
    the layer's weight becomes its dequantized self, so later layers calibrate against it."""
    h, rows = hessian.collect(run, m, batches)
    if rows == 0:
        ctx.progress.log(f"gptq: layer {name!r} did not run on the calibration inputs; using round-to-nearest")
        return
    qz = gptq.gptq(m.weight.detach(), h, config.format, config.groups)
    keep(f"{name}.weight", qz)
    deq = grid.dequantize(qz.q, qz.scale, qz.zero_point).reshape(m.weight.shape)
    with torch.no_grad():
        m.weight.copy_(deq)


def _cast(ckpt: Checkpoint, dense: dict[str, torch.Tensor], config: QuantizeConfig) -> Checkpoint:
    """fp16 / bf16: every floating-point tensor of the selected modules, cast (sparse weights
    stay stored sparse)."""
    out: dict[str, torch.Tensor] = {}
    encs: dict[str, dict[str, Any]] = {}
    cast = 0
    for name, t in dense.items():
        stored, spec, was_cast = cast_tensor(name, t, ckpt.encodings.get(name), config)
        out.update(stored)
        if spec is not None:
            encs[name] = spec
        cast += was_cast
    if not cast:
        raise UsageError(f"{ckpt.name}: no tensor matches --include/--exclude; nothing to cast")
    return Checkpoint(tensors=out, model=ckpt.model, encodings=encs, plan=ckpt.plan)


def cast_tensor(name: str, t: torch.Tensor, old: Spec | None, config: QuantizeConfig) -> tuple[dict[str, torch.Tensor], Spec | None, bool]:
    """fp16 / bf16 of one logical tensor ``t`` (stored before as ``old``): (stored tensors, spec,
    whether it was cast). A sparse tensor stays stored sparse."""
    module = name.rpartition(".")[0]
    was_cast = t.is_floating_point() and selected(module, config.include, config.exclude)
    if was_cast:
        t = t.to(_CASTS[config.scheme])
    sparse = {BITMASK.name: BITMASK, BITMASK_24.name: BITMASK_24}
    if old is not None and old["codec"] in sparse:
        stored, spec = sparse[old["codec"]].encode(name, t)
        return stored, None if spec is None else {**old, **spec}, was_cast
    return {name: t}, None, was_cast


_INT_FORMATS = {"int8": INT8, "int8-dynamic": INT8_DYNAMIC, "int4": INT4}

__all__ = [
    "CASTS",
    "GROUP_SIZES",
    "METHODS",
    "SCHEMES",
    "QuantizeConfig",
    "cast_tensor",
    "gptq_integers",
    "note_scheme",
    "quantize",
    "quantize_tensor",
    "quantized_weights",
]
CASTS = tuple(_CASTS)
