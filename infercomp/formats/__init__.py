"""Stored formats: how a quantized or sparse tensor is written, read back and run.

One module per family (``quantized``: int8 / int8-dynamic / int4 / fp8; ``sparse``: bitmask and
2:4), each format with a symmetric ``encode`` / ``decode`` (see ``base.Format``), and ONE explicit
registry below. Everything above this layer (checkpoint I/O, the loader, the transforms, the
measurements) reads and writes encoded tensors through these functions only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import torch

from infercomp.errors import CheckpointError
from infercomp.formats.base import Format, Spec, Tensors, spec_dtype
from infercomp.formats.quantized import FP8, INT4, INT8, INT8_DYNAMIC, PACK_QUANTIZED
from infercomp.formats.sparse import BITMASK, BITMASK_24

T = TypeVar("T")

FORMATS: dict[str, Format] = {f.name: f for f in (INT8, INT8_DYNAMIC, INT4, FP8, PACK_QUANTIZED, BITMASK, BITMASK_24)}
Encodings = Mapping[str, Spec]


def format_for(name: str, spec: Spec, where: str) -> Format:
    """The format of the encoded tensor ``name``; a CheckpointError for an unknown one."""
    key = spec.get("codec") if isinstance(spec, dict) else None
    if key not in FORMATS:
        raise CheckpointError(f"{where}: tensor {name!r} uses unknown encoding {key!r}; upgrade infercomp")
    return FORMATS[key]


def format_version(encodings: Encodings, where: str = "checkpoint") -> int:
    """The oldest checkpoint format that describes every encoded tensor (1 for none)."""
    return max([1, *(format_for(name, spec, where).version(spec) for name, spec in encodings.items())])


def stored_keys(encodings: Encodings, where: str = "checkpoint") -> dict[str, list[str]]:
    """Logical name -> stored keys, for every encoded tensor."""
    return {name: format_for(name, spec, where).keys(name, spec) for name, spec in encodings.items()}


def _split(tensors: Tensors, encodings: Encodings, where: str) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """(logical name -> its stored keys for encoded tensors, the plain tensors owned by no format)."""
    owned = stored_keys(encodings, where)
    taken = {k for keys in owned.values() for k in keys}
    return owned, {k: v for k, v in tensors.items() if k not in taken}


def logical_tensors(tensors: Tensors, encodings: Encodings, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The dense state dict a model expects: plain tensors as they are, encoded ones decoded."""
    _, out = _split(tensors, encodings, where)
    for name, spec in encodings.items():
        out[name] = decode(tensors, name, spec, where)
    return out


def decode(tensors: Tensors, name: str, spec: Spec, where: str = "checkpoint") -> torch.Tensor:
    """The dense tensor of one encoded tensor ``name`` from its stored parts in ``tensors``."""
    return _read(lambda fmt: fmt.decode(tensors, name, spec), tensors, name, spec, where)


def nonzero(tensors: Tensors, name: str, spec: Spec, where: str = "checkpoint") -> int | None:
    """``count_nonzero`` of encoded tensor ``name`` from its stored form (no decoding), where its
    format can tell; None otherwise."""
    return _read(lambda fmt: fmt.nonzero(tensors, name, spec), tensors, name, spec, where)


def _read(method: Callable[[Format], T], tensors: Tensors, name: str, spec: Spec, where: str) -> T:
    """``method(format)`` of ``name``'s format, which reads its stored parts; parts missing or not fitting their spec
    (a damaged or hostile file) are a CheckpointError naming the tensor."""
    fmt = format_for(name, spec, where)
    missing = [k for k in fmt.keys(name, spec) if k not in tensors]
    if missing:
        raise CheckpointError(f"{where}: encoded tensor {name!r} lacks stored tensor {missing[0]!r}")
    try:
        return method(fmt)
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as e:  # parts that do not fit their spec
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: encoded tensor {name!r} cannot be decoded from its stored parts ({detail[:200]})") from e


def logical_shapes(tensors: Tensors, encodings: Encodings, where: str = "checkpoint") -> dict[str, tuple[int, ...]]:
    """Shapes of the logical tensors without decoding (encodings record ``shape``)."""
    _, plain = _split(tensors, encodings, where)
    shapes = {k: tuple(v.shape) for k, v in plain.items()}
    shapes.update({name: tuple(spec["shape"]) for name, spec in encodings.items()})
    return shapes


class LogicalView(Mapping[str, torch.Tensor]):
    """``logical_tensors`` decoded on access, one tensor at a time, nothing kept: over a checkpoint
    read lazily, memory stays bounded by the largest tensor (statistics of files larger than RAM)."""

    def __init__(self, tensors: Tensors, encodings: Encodings, where: str = "checkpoint", shapes: Tensors | None = None):
        self.tensors, self.encodings, self.where = tensors, encodings, where
        self.order = stand_ins(tensors if shapes is None else shapes, encodings, where)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.order:
            raise KeyError(name)
        spec = self.encodings.get(name)
        return self.tensors[name] if spec is None else decode(self.tensors, name, spec, self.where)

    def __contains__(self, name: object) -> bool:
        return name in self.order

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def stand_ins(tensors: Tensors, encodings: Encodings, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Shape-and-dtype stand-ins (``device="meta"``) of the logical tensors, in ``logical_tensors``'
    order (plain tensors as stored, then the encoded ones), without decoding anything."""
    _, plain = _split(tensors, encodings, where)
    out = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in plain.items()}
    out.update({name: torch.empty(spec["shape"], dtype=spec_dtype(spec), device="meta") for name, spec in encodings.items()})
    return out


def stored_bytes(tensors: Tensors, encodings: Encodings, where: str = "checkpoint") -> dict[str, int]:
    """Bytes each logical tensor takes in storage (all of its stored parts)."""
    owned, plain = _split(tensors, encodings, where)
    nbytes = {k: v.numel() * v.element_size() for k, v in plain.items()}
    for name, keys in owned.items():
        nbytes[name] = sum(tensors[k].numel() * tensors[k].element_size() for k in keys if k in tensors)
    return nbytes


def stored_form(
    tensors: Tensors, encodings: Encodings, drop: Iterable[str], where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Spec]]:
    """The stored tensors and encodings of every logical tensor except those in ``drop``, as they
    are (encoded ones stay encoded): what a transform keeps of the tensors it does not touch."""
    drop = set(drop)
    owned, plain = _split(tensors, encodings, where)
    out = {k: v for k, v in plain.items() if k not in drop}
    encs: dict[str, Spec] = {}
    for name, spec in encodings.items():
        if name not in drop:
            out.update({k: tensors[k] for k in owned[name]})
            encs[name] = spec
    return out, encs


__all__ = [
    "FORMATS",
    "Format",
    "LogicalView",
    "decode",
    "stand_ins",
    "Spec",
    "Tensors",
    "format_for",
    "format_version",
    "logical_shapes",
    "logical_tensors",
    "stored_bytes",
    "stored_form",
    "stored_keys",
]
