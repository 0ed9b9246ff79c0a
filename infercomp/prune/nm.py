"""N:M semi-structured masks: in every group of M consecutive inputs of an output row, keep N."""

from __future__ import annotations

import torch


def nm_fits(w: torch.Tensor, m: int) -> bool:
    """Whether the input size of ``w`` (in_features, or in_channels·kh·kw) divides into groups of ``m``."""
    return (w.numel() // w.shape[0]) % m == 0


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` of every ``m`` consecutive entries along the input dimension
    (the highest scores; ties broken by position). ``scores`` is (out, in, ...) with in·... % m == 0."""
    groups = scores.reshape(-1, m)  # (out·in/m, m)
    keep = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return mask.view_as(scores)


def is_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs holds at most ``n`` non-zeros."""
    if not nm_fits(w, m):
        return False
    return bool(((w.reshape(-1, m) != 0).sum(dim=1) <= n).all())
