"""Base for the transform configs (``PruneConfig``, ``QuantizeConfig``, ``DistillConfig``):
frozen dataclasses that validate themselves, reject unknown keys and round-trip through JSON, so
an output checkpoint records exactly how it was made."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from infercomp.errors import UsageError

C = TypeVar("C", bound="TransformConfig")


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Common behaviour; subclasses set ``transform`` and add validated fields."""

    transform: ClassVar[str] = ""

    def inputs(self) -> tuple[str, ...]:
        """Files the transform reads besides the source checkpoint (never to be overwritten)."""
        return ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build from a dict, rejecting keys this config does not have."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**kwargs)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def choice(value: str, options: tuple[str, ...] | list[str], option: str) -> None:
    """Raise a UsageError naming the option unless ``value`` is one of ``options``."""
    if value not in options:
        raise UsageError(f"{option} {value!r} is not supported; choose one of: {', '.join(options)}")
