"""What every stored format shares: the ``Format`` interface and small spec helpers.

A checkpoint stores plain tensors. An *encoded* tensor (quantized, sparse) is stored as a few
plain tensors plus a JSON *spec* in the checkpoint's ``encodings`` map, keyed by its *logical*
name (the state-dict key the model expects, e.g. ``fc1.weight``). The spec's ``codec`` field names
the format; the format knows which stored keys belong to the tensor, how to write them
(``encode``), read them back (``decode``) and, where it pays, which module runs them directly
(``runtime``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

Tensors = Mapping[str, torch.Tensor]
Spec = dict[str, Any]

COUNT_BLOCK = 1 << 20  # values compared at a time: a 1 MiB bool temporary, however large the tensor


def count_nonzero(t: torch.Tensor) -> int:
    """``torch.count_nonzero(t)`` for any dtype (float8 included; -0.0 counts as zero, NaN as
    non-zero), in blocks: numpy counts each block's ``!= 0``, faster than torch's own count
    on CPU, with no tensor-sized temporary."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        return int(np.count_nonzero(flat.cpu().numpy()))
    return sum(int(np.count_nonzero((flat[i : i + COUNT_BLOCK] != 0).cpu().numpy())) for i in range(0, flat.numel(), COUNT_BLOCK))


class Format:
    """One stored format. Subclasses set ``name`` and implement ``keys``, ``encode`` and
    ``decode``; ``runtime`` and ``version`` have defaults.

    ``encode`` takes what the format needs (a dense tensor, or integers and scales that a
    quantizer chose) and returns ``(stored tensors, spec)``; ``decode(stored, name, spec)``
    returns the dense tensor of the logical shape and dtype, so ``decode(encode(x))`` is ``x`` up
    to the format's rounding.
    """

    name: ClassVar[str] = ""

    def keys(self, name: str, spec: Spec) -> list[str]:
        """The stored tensor names that make up the logical tensor ``name``."""
        raise NotImplementedError

    def decode(self, tensors: Tensors, name: str, spec: Spec) -> torch.Tensor:
        """The dense tensor (logical shape, the spec's dtype)."""
        raise NotImplementedError

    def runtime(self, old: nn.Module, tensors: Tensors, name: str, spec: Spec) -> nn.Module | None:
        """A module replacing ``old`` (whose ``weight`` is ``name``) that runs the stored form
        directly, or None to decode the weight and load it into ``old`` as usual."""
        del old, tensors, name, spec
        return None

    def nonzero(self, tensors: Tensors, name: str, spec: Spec) -> int | None:
        """``count_nonzero`` of the decoded tensor, read from the stored form without decoding it,
        or None when only decoding can tell."""
        del tensors, name, spec
        return None

    def version(self, spec: Spec) -> int:
        """The oldest checkpoint format version that describes this tensor (raise it when a spec
        gains a field that older readers would silently ignore)."""
        del spec
        return 1


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (as specs record it)."""
    return str(dtype).removeprefix("torch.")


def spec_dtype(spec: Spec) -> torch.dtype:
    """The logical dtype a spec records (float32 when absent)."""
    return getattr(torch, spec.get("dtype", "float32"))
