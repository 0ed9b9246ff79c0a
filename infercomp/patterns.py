"""``--include`` / ``--exclude`` glob patterns over module names, shared by the transforms."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch


def selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """True when ``name`` matches an include pattern (or none are given) and no exclude pattern."""
    if include and not any(fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatchcase(name, p) for p in exclude)


def selected_weight(name: str, t: torch.Tensor, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Weight matrices, filters and embedding tables (floating point, 2-D and up, not empty) of
    the modules the patterns select: what prune and quantize work on."""
    module, _, attr = name.rpartition(".")
    return attr == "weight" and t.dim() >= 2 and t.numel() > 0 and t.is_floating_point() and selected(module, include, exclude)
