"""``--include`` / ``--exclude`` glob patterns over module names, shared by the transforms."""

from __future__ import annotations

from fnmatch import fnmatchcase


def selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """True when ``name`` matches an include pattern (or none are given) and no exclude pattern."""
    if include and not any(fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatchcase(name, p) for p in exclude)
