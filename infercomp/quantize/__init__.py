"""Quantization: store and run weights in fewer bits.
``quantize(ckpt, QuantizeConfig(...), ctx) -> Checkpoint``.

Schemes (``SCHEMES``) and how each is stored (compressed-tensors naming where it fits):

| scheme         | stored tensors of ``<m>.weight``                                      | runs as |
|----------------|------------------------------------------------------------------------|---------|
| int8           | ``<m>.weight`` int8, ``<m>.weight_scale`` (out, groups) [, ``<m>.weight_column_scale`` (in,)] | weight-only int8 |
| int8-dynamic   | same as int8 (per channel)                                             | int8 x int8 kernels, activations quantized per call |
| int4           | ``<m>.weight_packed`` uint8 (two per byte), ``<m>.weight_scale``, ``<m>.weight_zero_point`` (asymmetric) [, ``<m>.weight_column_scale``] | weight-only int4 |
| fp8            | ``<m>.weight`` float8_e4m3fn, ``<m>.weight_scale`` (out, 1)            | fp8 matmul on CUDA >= sm89, else dequantized |
| fp16, bf16     | every float tensor cast                                                | float32 compute |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from infercomp import encodings
from infercomp.checkpoint import Checkpoint
from infercomp.config import TransformConfig, choice
from infercomp.encodings import Codec, Tensors
from infercomp.errors import UsageError
from infercomp.glob import selected
from infercomp.quantize import gptq, runtime, schemes
from infercomp.quantize.schemes import IntFormat, Quantized

if TYPE_CHECKING:
    from infercomp.pipeline import Context

SCHEMES = ("int8", "int8-dynamic", "int4", "fp8", "fp16", "bf16")
METHODS = ("rtn", "gptq")
GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP = 32
_INT_BITS = {"int8": 8, "int8-dynamic": 8, "int4": 4}
_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class QuantizeConfig(TransformConfig):
    """How to quantize.

    Attributes:
        scheme: see ``SCHEMES``.
        group_size: columns sharing one scale (32, 64, 128); None: one scale per output channel
            for int8, ``DEFAULT_INT4_GROUP`` for int4.
        asymmetric: int4 only: a zero point per group (range [0, 15]) instead of symmetric [-8, 7].
        method: ``rtn`` (round to nearest) or ``gptq`` (error-compensating; needs calibration data).
        calib_samples: calibration inputs GPTQ uses (the first ones of ``--data``).
        column_scales: int8 / int4 with RTN: None (default) gives a tensor column scales when they
            lower its reconstruction error (``schemes.choose_column_scale``); True on every
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
            if self.group_size not in GROUP_SIZES:
                raise UsageError(f"--group-size {self.group_size} is not supported; choose one of: {', '.join(map(str, GROUP_SIZES))}")
            if self.scheme not in ("int8", "int4"):
                raise UsageError(f"--group-size applies to --scheme int8 and int4, not {self.scheme} (which uses one scale per channel)")
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
        if self.scheme == "int4" and self.group_size is None:
            return DEFAULT_INT4_GROUP
        return self.group_size

    @property
    def format(self) -> IntFormat:
        return IntFormat(_INT_BITS[self.scheme], symmetric=not self.asymmetric)


# -------------------------------------------------------------------------------------- codecs


def _dtype(spec: dict[str, Any]) -> torch.dtype:
    return getattr(torch, spec.get("dtype", "float32"))


def _int8_keys(name: str, spec: dict[str, Any]) -> list[str]:
    keys = [name, f"{name}_scale"]
    return [*keys, f"{name}_column_scale"] if spec.get("column_scale") else keys


def _int8_decode(tensors: Tensors, name: str, spec: dict[str, Any]) -> torch.Tensor:
    q = tensors[name].reshape(spec["shape"][0], -1)
    w = schemes.dequantize(q, tensors[f"{name}_scale"], None, column_scale=runtime.column_scale_of(tensors, name, spec))
    return w.reshape(spec["shape"]).to(_dtype(spec))


def _int4_keys(name: str, spec: dict[str, Any]) -> list[str]:
    keys = [f"{name}_packed", f"{name}_scale"]
    if not spec.get("symmetric", True):
        keys.append(f"{name}_zero_point")
    return [*keys, f"{name}_column_scale"] if spec.get("column_scale") else keys


def _int4_decode(tensors: Tensors, name: str, spec: dict[str, Any]) -> torch.Tensor:
    sym = spec.get("symmetric", True)
    q = schemes.unpack_int4(tensors[f"{name}_packed"], sym)
    zp = None if sym else tensors[f"{name}_zero_point"]
    w = schemes.dequantize(q, tensors[f"{name}_scale"], zp, column_scale=runtime.column_scale_of(tensors, name, spec))
    return w.reshape(spec["shape"]).to(_dtype(spec))


def _fp8_decode(tensors: Tensors, name: str, spec: dict[str, Any]) -> torch.Tensor:
    w = schemes.dequantize_fp8(tensors[name].reshape(spec["shape"][0], -1), tensors[f"{name}_scale"])
    return w.reshape(spec["shape"]).to(_dtype(spec))


def _runtime(kind: str):
    def build(old: nn.Module, tensors: Tensors, name: str, spec: dict[str, Any]) -> nn.Module:
        return runtime.build(kind, old, tensors, name, spec)

    return build


def _format_version(spec: dict[str, Any]) -> int:
    return 2 if spec.get("column_scale") else 1  # format 2 added column scales


CODECS: dict[str, Codec] = {
    "int8": Codec(keys=_int8_keys, decode=_int8_decode, runtime=_runtime("int8"), format_version=_format_version),
    "int8-dynamic": Codec(keys=_int8_keys, decode=_int8_decode, runtime=_runtime("int8-dynamic")),
    "int4": Codec(keys=_int4_keys, decode=_int4_decode, runtime=_runtime("int4"), format_version=_format_version),
    "fp8": Codec(keys=_int8_keys, decode=_fp8_decode, runtime=_runtime("fp8")),
}


# ----------------------------------------------------------------------------------- transform


def quantizable(name: str, t: torch.Tensor, config: QuantizeConfig) -> bool:
    """Weight matrices, filters and embedding tables (2-D and up) of the selected modules."""
    module, _, attr = name.rpartition(".")
    return attr == "weight" and t.dim() >= 2 and t.is_floating_point() and selected(module, config.include, config.exclude)


def quantize(ckpt: Checkpoint, config: QuantizeConfig, ctx: Context) -> Checkpoint:
    """Apply ``config`` to ``ckpt`` and return the quantized checkpoint (encoded tensors described
    in ``encodings``; everything not selected is kept as it was, decoded if it was encoded)."""
    dense = encodings.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    if config.scheme in _CASTS:
        return _cast(ckpt, dense, config)
    chosen = {n: t for n, t in dense.items() if quantizable(n, t, config)}
    chosen = _check_groups(ckpt, chosen, config, ctx)
    done: dict[str, Quantized] = {}
    if config.method == "gptq":
        done = _gptq(ckpt, dense, chosen, config, ctx)
    out: dict[str, torch.Tensor] = {}
    encs: dict[str, dict[str, Any]] = {}
    with ctx.progress.task(f"quantizing {len(chosen)} tensors to {config.scheme}", total=len(chosen)) as task:
        for name, t in dense.items():
            if name not in chosen:
                out[name] = t
                continue
            spec = {"codec": config.scheme, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            if config.scheme == "fp8":
                out[name], out[f"{name}_scale"] = schemes.quantize_fp8(t)
                spec["granularity"] = "channel"
            else:
                qz = done.get(name) or _rtn(t, config)
                spec.update(_int_spec(config, name in done))
                if qz.column_scale is not None:
                    spec["column_scale"] = True
                out.update(_store(name, qz, config))
            encs[name] = spec
            task.advance()
    if config.scheme == "fp8":
        how = (
            "torch._scaled_mm"
            if runtime.fp8_matmul_supported(ctx.device)
            else "dequantized to float on the fly (fp8 matmul needs a CUDA GPU of compute capability >= 8.9)"
        )
        ctx.progress.log(f"fp8: stored as float8_e4m3fn with per-channel scales; Linear layers on {ctx.device.type} run {how}")
    return Checkpoint(tensors=out, model=ckpt.model, encodings=encs, plan=ckpt.plan)


def _rtn(t: torch.Tensor, config: QuantizeConfig) -> Quantized:
    if config.scheme not in ("int8", "int4") or config.column_scales is False:
        return schemes.quantize_rtn(t, config.format, config.groups)
    if config.column_scales:
        return schemes.quantize_rtn(t, config.format, config.groups, schemes.column_scales(t))
    return schemes.choose_column_scale(t, config.format, config.groups)


def _int_spec(config: QuantizeConfig, by_gptq: bool) -> dict[str, Any]:
    g = config.groups
    return {
        "bits": config.format.bits,
        "symmetric": config.format.symmetric,
        "granularity": "channel" if g is None else "group",
        "group_size": g,
        "method": "gptq" if by_gptq else "rtn",
    }


def _store(name: str, qz: Quantized, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    if config.scheme == "int4":
        out = {f"{name}_packed": schemes.pack_int4(qz.q, config.format.symmetric), f"{name}_scale": qz.scale}
    else:
        out = {name: qz.q, f"{name}_scale": qz.scale}
    if qz.zero_point is not None:
        out[f"{name}_zero_point"] = qz.zero_point
    if qz.column_scale is not None:
        out[f"{name}_column_scale"] = qz.column_scale
    return out


def _check_groups(ckpt: Checkpoint, chosen: dict[str, torch.Tensor], config: QuantizeConfig, ctx: Context) -> dict[str, torch.Tensor]:
    """Drop tensors whose rows do not split into groups (noted); an error when the user named
    them with --include, or when nothing is left."""
    g = config.groups
    if not chosen:
        raise UsageError(f"{ckpt.name}: no weight matches --include/--exclude; nothing to quantize")
    if g is None:
        return chosen
    keep, skipped = {}, []
    for name, t in chosen.items():
        n = t.numel() // t.shape[0]
        if n % g == 0:
            keep[name] = t
            continue
        why = f"tensor {name!r} has rows of {n} values, not divisible by --group-size {g}"
        if config.include:
            raise UsageError(f"{ckpt.name}: {why}; choose a --group-size that divides {n} or --exclude {name.rpartition('.')[0]}")
        skipped.append(name)
        ctx.progress.log(f"{why}: left unquantized")
    if not keep:
        raise UsageError(
            f"{ckpt.name}: no weight has rows divisible by --group-size {g} (e.g. {skipped[0]!r}); choose a smaller --group-size"
        )
    return keep


def _gptq(
    ckpt: Checkpoint, dense: dict[str, torch.Tensor], chosen: dict[str, torch.Tensor], config: QuantizeConfig, ctx: Context
) -> dict[str, Quantized]:
    """GPTQ for the Linear / Conv2d layers among ``chosen``; the others are left to RTN."""
    if ctx.data is None:
        raise UsageError("--method gptq needs calibration inputs: pass --data FILE (its first --calib-samples inputs are used)")
    if not ctx.loader.can_build(ckpt):
        raise UsageError(f"{ckpt.name}: --method gptq runs the model and needs its code: pass --model REF")
    model = ctx.loader.build(Checkpoint(tensors=dense, model=ckpt.model, plan=ckpt.plan, path=ckpt.path), runtime=False).float()
    calib = ctx.data.inputs[: config.calib_samples]
    batches = [calib[i : i + 32] for i in range(0, len(calib), 32)]
    layers = [(n, m) for n, m in model.named_modules() if f"{n}.weight" in chosen and gptq.supported(m)]
    done: dict[str, Quantized] = {}
    with ctx.progress.task(f"gptq on {len(calib)} calibration inputs", total=len(layers)) as task:
        for n, m in layers:
            h, rows = gptq.hessian(model, m, batches)
            if rows == 0:
                ctx.progress.log(f"gptq: layer {n!r} did not run on the calibration inputs; using round-to-nearest")
                task.advance()
                continue
            qz = gptq.gptq(m.weight.detach(), h, config.format, config.groups)
            done[f"{n}.weight"] = qz
            # Later layers calibrate against this layer's quantized output.
            deq = schemes.dequantize(qz.q, qz.scale, qz.zero_point).reshape(m.weight.shape)
            with torch.no_grad():
                m.weight.copy_(deq)
            task.advance()
    return done


def _cast(ckpt: Checkpoint, dense: dict[str, torch.Tensor], config: QuantizeConfig) -> Checkpoint:
    """fp16 / bf16: every floating-point tensor of the selected modules, cast."""
    from infercomp.prune import storage  # sparse weights stay stored sparse after the cast

    dtype = _CASTS[config.scheme]
    out: dict[str, torch.Tensor] = {}
    encs: dict[str, dict[str, Any]] = {}
    cast = 0
    for name, t in dense.items():
        module = name.rpartition(".")[0]
        if t.is_floating_point() and selected(module, config.include, config.exclude):
            t = t.to(dtype)
            cast += 1
        old = ckpt.encodings.get(name)
        if old is not None and old["codec"] in (storage.BITMASK, storage.BITMASK_24):
            stored, spec = storage.encode(name, t, codec=old["codec"], force=old["codec"] == storage.BITMASK_24)
            out.update(stored)
            if spec is not None:
                encs[name] = {**old, **spec}
        else:
            out[name] = t
    if not cast:
        raise UsageError(f"{ckpt.name}: no tensor matches --include/--exclude; nothing to cast")
    return Checkpoint(tensors=out, model=ckpt.model, encodings=encs, plan=ckpt.plan)


__all__ = ["CODECS", "GROUP_SIZES", "METHODS", "SCHEMES", "QuantizeConfig", "quantize"]
