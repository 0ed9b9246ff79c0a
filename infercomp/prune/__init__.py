"""Pruning: remove weights. ``prune(ckpt, PruneConfig(...), ctx) -> Checkpoint``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from infercomp import encodings
from infercomp.checkpoint import Checkpoint
from infercomp.config import TransformConfig, choice
from infercomp.encodings import Codec
from infercomp.errors import UsageError
from infercomp.glob import selected

if TYPE_CHECKING:
    from infercomp.pipeline import Context

METHODS = ("magnitude",)
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class PruneConfig(TransformConfig):
    """How to prune.

    Attributes:
        method: see ``METHODS``.
        sparsity: fraction of weights to remove, 0 <= s < 1.
        scope: ``layer`` (each tensor reaches ``sparsity``) or ``global`` (one threshold for all).
        include / exclude: glob patterns on module names (``fc*``, ``layers.*.q``).
    """

    transform: ClassVar[str] = "prune"
    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str = "layer"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        choice(self.method, METHODS, "--method")
        choice(self.scope, SCOPES, "--scope")
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"--sparsity must be in [0, 1), got {self.sparsity}")


def prunable(name: str, t: torch.Tensor, config: PruneConfig) -> bool:
    """Weight matrices / filters (2-D and up) of the selected modules."""
    module, _, attr = name.rpartition(".")
    return attr == "weight" and t.dim() >= 2 and t.is_floating_point() and selected(module, config.include, config.exclude)


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks removing the smallest |w|: exactly ``round(sparsity * n)`` per tensor (layer) or
    over all tensors together (global). Ties are broken by position, so the count is exact."""
    if scope == "layer":
        return {n: _keep_largest(w.abs().flatten(), w.numel() - round(sparsity * w.numel())).view_as(w) for n, w in weights.items()}
    flat = torch.cat([w.abs().flatten().float() for w in weights.values()])
    keep = _keep_largest(flat, flat.numel() - round(sparsity * flat.numel()))
    out, i = {}, 0
    for n, w in weights.items():
        out[n] = keep[i : i + w.numel()].view_as(w)
        i += w.numel()
    return out


def _keep_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(scores, k, sorted=False).indices] = True
    return mask


def prune(ckpt: Checkpoint, config: PruneConfig, ctx: Context) -> Checkpoint:
    """Apply ``config`` to ``ckpt`` and return the pruned checkpoint (dense storage)."""
    del ctx
    dense = encodings.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    targets = {n: t for n, t in dense.items() if prunable(n, t, config)}
    if not targets:
        raise UsageError(f"{ckpt.name}: no weight matches --include/--exclude; nothing to prune")
    masks = magnitude_masks(targets, config.sparsity, config.scope)
    out = dict(dense)
    for n, m in masks.items():
        out[n] = dense[n] * m
    return Checkpoint(tensors=out, model=ckpt.model)


CODECS: dict[str, Codec] = {}
__all__ = ["CODECS", "METHODS", "PruneConfig", "magnitude_masks", "prune"]
