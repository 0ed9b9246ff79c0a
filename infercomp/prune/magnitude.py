"""Unstructured masks: keep the largest scores, with exact counts."""

from __future__ import annotations

import torch


def keep_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a 1-D ``scores`` (ties broken by position, so
    exactly ``k`` are kept)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        # A stable sort breaks ties by position; topk's choice among equal values is unspecified.
        mask[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return mask


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks removing the smallest |w|: exactly ``round(sparsity * n)`` per tensor (``layer``)
    or over all tensors together (``global``)."""
    return score_masks({n: w.abs() for n, w in weights.items()}, sparsity, scope)


def score_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks removing the lowest scores, per tensor (``layer``), per output row (``row``:
    every row loses ``round(sparsity * cols)``) or over all tensors together (``global``)."""
    if scope == "layer":
        return {n: keep_largest(s.flatten(), s.numel() - round(sparsity * s.numel())).view_as(s) for n, s in scores.items()}
    if scope == "row":
        out = {}
        for n, s in scores.items():
            rows = s.reshape(s.shape[0], -1)  # (out, in·kh·kw)
            k = rows.shape[1] - round(sparsity * rows.shape[1])
            mask = torch.zeros_like(rows, dtype=torch.bool)
            if k > 0:
                mask.scatter_(1, torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k], True)
            out[n] = mask.view_as(s)
        return out
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    keep = keep_largest(flat, flat.numel() - round(sparsity * flat.numel()))
    out, i = {}, 0
    for n, s in scores.items():
        out[n] = keep[i : i + s.numel()].view_as(s)
        i += s.numel()
    return out
