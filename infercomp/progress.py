"""Progress reporting seen by library code. The default does nothing; the CLI passes a rich-backed
one that draws on stderr. Library code never imports rich."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Task:
    """One bar: ``advance`` by steps, with extra fields (loss, ...) shown beside it."""

    def advance(self, n: float = 1, **fields: Any) -> None:
        del n, fields


class Progress:
    """No-op progress (library default)."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        del description, total
        yield Task()

    def log(self, message: str) -> None:
        """A warning or note for the user (stderr in the CLI)."""
        del message


NULL = Progress()
