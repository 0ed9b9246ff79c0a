"""What every transform shares: ``TransformConfig`` (the base of ``PruneConfig``,
``QuantizeConfig``, ``DistillConfig``), the ``Context`` a transform may use, and the transform
protocol ``(Checkpoint, config, Context) -> Checkpoint``.

Configs are frozen dataclasses that validate themselves and serialise to JSON, so an output
checkpoint records exactly how it was made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from infercomp.checkpoint import Checkpoint
from infercomp.data import Dataset
from infercomp.errors import UsageError
from infercomp.models import ModelLoader
from infercomp.progress import NULL, Progress


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Common behaviour; subclasses set ``transform`` and add validated fields."""

    transform: ClassVar[str] = ""
    # Threads the transform runs with, so that its output does not depend on the machine's thread
    # count (a matmul's summation order does): the same input, options and seed give the same
    # bytes. None: the caller's threads (distill, where one thread would cost too much).
    threads: ClassVar[int | None] = 1

    def inputs(self) -> tuple[str, ...]:
        """Files the transform reads besides the source checkpoint (never to be overwritten)."""
        return ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def choice(value: str, options: tuple[str, ...] | list[str], option: str) -> None:
    """Raise a UsageError naming the option unless ``value`` is one of ``options``."""
    if value not in options:
        raise UsageError(f"{option} {value!r} is not supported; choose one of: {', '.join(options)}")


@contextmanager
def pinned_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: as it is), restoring the count after: a
    transform's ``threads`` pins its numerics to one thread count, so its output is reproducible."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Context:
    """What a transform may use besides the checkpoint and its config.

    Attributes:
        loader: builds modules for checkpoints (trust rules included).
        data: ``--data`` (calibration, training), or None.
        device: where models run.
        progress: progress bars and warnings (no-op by default).
        source / output: the input checkpoint's path and the output's (distill keeps its
            training state next to the output).
    """

    loader: ModelLoader
    data: Dataset | None
    device: torch.device
    progress: Progress = NULL
    source: Path | None = None
    output: Path | None = None


class Transform(Protocol):
    """A transform: a new checkpoint from ``ckpt`` as ``config`` says; never modifies ``ckpt``."""

    def __call__(self, ckpt: Checkpoint, config: Any, ctx: Context, /) -> Checkpoint: ...
