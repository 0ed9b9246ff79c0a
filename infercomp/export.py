"""Export: a checkpoint as plain dense tensors, for loaders that know no compression format.
``export(ckpt, ExportConfig(dtype=...), ctx) -> Checkpoint``.

Every encoded tensor (sparse bitmask, int8 / int4 / fp8 / pack-quantized) is decoded to its
logical shape and dtype; pruned shapes stay pruned (the model keeps its new, smaller layers; a
Hugging Face directory output whose config.json cannot describe them is zero-padded instead,
``hf.padded``). With
``dtype`` every floating-point tensor is cast to it. The same conversion is ``--export dense`` on
any transform (``pipeline.run(export="dense")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import infercomp.formats as formats
from infercomp.checkpoint import Checkpoint
from infercomp.transform import Context, TransformConfig, choice

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORTS = ("dense",)


@dataclass(frozen=True)
class ExportConfig(TransformConfig):
    """How to export.

    Attributes:
        dtype: ``fp32``, ``fp16`` or ``bf16`` for every floating-point tensor; None keeps each
            tensor's logical dtype (what it was before it was compressed).
    """

    transform: ClassVar[str] = "export"
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            choice(self.dtype, tuple(DTYPES), "--dtype")


def dense(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> Checkpoint:
    """``ckpt`` with every tensor decoded to plain dense form (and floats cast to ``dtype``)."""
    tensors = formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    return Checkpoint(tensors=tensors, model=ckpt.model, history=list(ckpt.history), encodings={}, plan=ckpt.plan)


def export(ckpt: Checkpoint, config: ExportConfig, ctx: Context) -> Checkpoint:
    """The plain dense checkpoint ``config`` describes."""
    del ctx
    return dense(ckpt, DTYPES[config.dtype] if config.dtype is not None else None)
