"""N:M semi-structured masks: in every group of M consecutive inputs of an output row, keep N."""

from __future__ import annotations

import torch

from infercomp.formats.sparse import is_nm, nm_fits  # what a stored tensor's structure is: a format's question

__all__ = ["is_nm", "nm_fits", "nm_mask"]


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` of every ``m`` consecutive entries along the input dimension
    (the highest scores; ties broken by position). ``scores`` is (out, in, ...) with in·... % m == 0."""
    groups = scores.reshape(-1, m)  # (out·in/m, m)
    keep = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return mask.view_as(scores)
