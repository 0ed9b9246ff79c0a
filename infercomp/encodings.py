"""Encoded tensors: how a quantized or sparse weight is stored, and how to read it back.

A checkpoint stores plain tensors; ``Checkpoint.encodings`` maps a *logical* tensor name (the
state-dict key the model expects, e.g. ``fc1.weight``) to a description ``{"codec": NAME, ...}``.
Each codec knows which stored keys belong to it (compressed-tensors naming where it fits:
``fc1.weight_packed``, ``fc1.weight_scale``, ``fc1.bitmask``), how to decode them to the dense
tensor, and optionally how to build a module that *runs* the encoded form (int8 kernels, ...).

Transform families own their codecs (``infercomp.quantize.CODECS``, ``infercomp.prune.CODECS``);
this module merges them into one explicit registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from infercomp.errors import CheckpointError

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Codec:
    """How one storage format is read back.

    Attributes:
        keys: (logical name, spec) -> the stored tensor names that make up this tensor.
        decode: (stored tensors, logical name, spec) -> the dense tensor (logical shape, float).
        runtime: optional (parent module, attribute name, stored tensors, logical name, spec) ->
            replacement module that runs the encoded weight directly; None means "decode and load".
        format_version: optional spec -> the oldest checkpoint format that describes this tensor
            (None: 1). A codec raises it when a spec gains a field older readers would ignore.
    """

    keys: Callable[[str, dict[str, Any]], list[str]]
    decode: Callable[[Tensors, str, dict[str, Any]], torch.Tensor]
    runtime: Callable[[nn.Module, Tensors, str, dict[str, Any]], nn.Module] | None = None
    format_version: Callable[[dict[str, Any]], int] | None = None


def registry() -> dict[str, Codec]:
    """All codecs by name (imported lazily: the transform packages import this module)."""
    from infercomp.prune import CODECS as prune_codecs
    from infercomp.quantize import CODECS as quant_codecs

    return {**quant_codecs, **prune_codecs}


def codec_for(name: str, spec: dict[str, Any], where: str) -> Codec:
    codecs = registry()
    key = spec.get("codec")
    if key not in codecs:
        raise CheckpointError(f"{where}: tensor {name!r} uses unknown encoding {key!r}; upgrade infercomp")
    return codecs[key]


def format_version(encodings: Mapping[str, dict[str, Any]], where: str = "checkpoint") -> int:
    """The oldest checkpoint format that describes every encoded tensor (1 for none)."""
    versions = [1]
    for name, spec in encodings.items():
        codec = codec_for(name, spec, where)
        if codec.format_version is not None:
            versions.append(codec.format_version(spec))
    return max(versions)


def stored_keys(encodings: Mapping[str, dict[str, Any]], where: str = "checkpoint") -> dict[str, list[str]]:
    """Logical name -> stored keys, for every encoded tensor."""
    return {name: codec_for(name, spec, where).keys(name, spec) for name, spec in encodings.items()}


def _split(tensors: Tensors, encodings: Mapping[str, dict[str, Any]], where: str) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """(logical name -> its stored keys for encoded tensors, the plain tensors owned by no codec)."""
    owned = stored_keys(encodings, where)
    taken = {k for keys in owned.values() for k in keys}
    return owned, {k: v for k, v in tensors.items() if k not in taken}


def logical_tensors(tensors: Tensors, encodings: Mapping[str, dict[str, Any]], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The dense state dict a model expects: plain tensors as they are, encoded ones decoded."""
    owned, out = _split(tensors, encodings, where)
    for name, spec in encodings.items():
        missing = [k for k in owned[name] if k not in tensors]
        if missing:
            raise CheckpointError(f"{where}: encoded tensor {name!r} lacks stored tensor {missing[0]!r}")
        out[name] = codec_for(name, spec, where).decode(tensors, name, spec)
    return out


def logical_shapes(tensors: Tensors, encodings: Mapping[str, dict[str, Any]], where: str = "checkpoint") -> dict[str, tuple[int, ...]]:
    """Shapes of the logical tensors without decoding (encodings record ``shape``)."""
    _, plain = _split(tensors, encodings, where)
    shapes = {k: tuple(v.shape) for k, v in plain.items()}
    shapes.update({name: tuple(spec["shape"]) for name, spec in encodings.items()})
    return shapes


def stored_bytes(tensors: Tensors, encodings: Mapping[str, dict[str, Any]], where: str = "checkpoint") -> dict[str, int]:
    """Bytes each logical tensor takes in storage (all of its stored parts)."""
    owned, plain = _split(tensors, encodings, where)
    nbytes = {k: v.numel() * v.element_size() for k, v in plain.items()}
    for name, keys in owned.items():
        nbytes[name] = sum(tensors[k].numel() * tensors[k].element_size() for k in keys if k in tensors)
    return nbytes
