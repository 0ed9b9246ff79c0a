"""Quantization: store and run weights in fewer bits.
``quantize(ckpt, QuantizeConfig(...), ctx) -> Checkpoint``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from infercomp import encodings
from infercomp.checkpoint import Checkpoint
from infercomp.config import TransformConfig, choice
from infercomp.encodings import Codec, Tensors
from infercomp.errors import UsageError
from infercomp.glob import selected

if TYPE_CHECKING:
    from infercomp.pipeline import Context

SCHEMES = ("int8",)


@dataclass(frozen=True)
class QuantizeConfig(TransformConfig):
    """How to quantize.

    Attributes:
        scheme: see ``SCHEMES``.
        include / exclude: glob patterns on module names.
    """

    transform: ClassVar[str] = "quantize"
    scheme: str = "int8"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        choice(self.scheme, SCHEMES, "--scheme")


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: q = round(w / s), s = max|w_row| / 127.
    Returns q (out, in) int8 and s (out, 1) float32."""
    w2 = w.float().reshape(w.shape[0], -1)
    scale = (w2.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    q = torch.round(w2 / scale).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def _int8_keys(name: str, spec: dict[str, Any]) -> list[str]:
    del spec
    return [name, f"{name}_scale"]


def _int8_decode(tensors: Tensors, name: str, spec: dict[str, Any]) -> torch.Tensor:
    q, s = tensors[name], tensors[f"{name}_scale"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    return (q.float().reshape(q.shape[0], -1) * s).reshape(spec["shape"]).to(dtype)


class Int8WeightOnlyLinear(nn.Module):
    """Linear layer with int8 weights and per-channel scales, run by torch's int8 weight-only
    matmul kernel on CPU (``_weight_int8pack_mm``), dequantized on other devices."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("weight_scale", scale.reshape(-1).float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and x2.dtype in (torch.float32, torch.bfloat16, torch.float16):
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.weight_scale.to(x2.dtype))
        else:
            y = F.linear(x2, self.weight.to(x2.dtype) * self.weight_scale.to(x2.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def _int8_runtime(old: nn.Module, tensors: Tensors, name: str, spec: dict[str, Any]) -> nn.Module:
    if not isinstance(old, nn.Linear):  # conv etc.: decode and run dense
        old.weight = nn.Parameter(_int8_decode(tensors, name, spec), requires_grad=False)
        bias_key = name.removesuffix("weight") + "bias"
        if bias_key in tensors and old.bias is not None:
            old.bias = nn.Parameter(tensors[bias_key].float(), requires_grad=False)
        return old
    bias = tensors.get(name.removesuffix("weight") + "bias")
    return Int8WeightOnlyLinear(tensors[name], tensors[f"{name}_scale"], bias)


CODECS: dict[str, Codec] = {"int8": Codec(keys=_int8_keys, decode=_int8_decode, runtime=_int8_runtime)}


def quantize(ckpt: Checkpoint, config: QuantizeConfig, ctx: Context) -> Checkpoint:
    """Apply ``config`` to ``ckpt``: selected weight matrices become int8 + scales."""
    del ctx
    dense = encodings.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    out: dict[str, torch.Tensor] = {}
    encs: dict[str, dict[str, Any]] = {}
    for name, t in dense.items():
        module, _, attr = name.rpartition(".")
        if attr == "weight" and t.dim() >= 2 and t.is_floating_point() and selected(module, config.include, config.exclude):
            q, s = quantize_int8_rows(t)
            out[name], out[f"{name}_scale"] = q, s
            encs[name] = {"codec": "int8", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "granularity": "channel"}
        else:
            out[name] = t
    if not encs:
        raise UsageError(f"{ckpt.name}: no weight matches --include/--exclude; nothing to quantize")
    return Checkpoint(tensors=out, model=ckpt.model, encodings=encs)


__all__ = ["CODECS", "SCHEMES", "QuantizeConfig", "quantize"]
