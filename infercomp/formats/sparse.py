"""Sparse storage: a bitmask of the non-zeros plus their values (compressed-tensors' layout).

A weight ``W`` viewed as (rows, cols) = (out, in·kh·kw) is stored as
- ``<name>.bitmask``     uint8 (rows, ceil(cols / 8)): bit j % 8 of byte j // 8 is 1 where W[r, j] != 0
                         (numpy ``packbits(..., bitorder="little")`` along each row);
- ``<name>.compressed``  (nnz,) the non-zero values in row-major order, in the weight's own dtype;
and the logical shape and dtype in the encoding spec. compressed-tensors also stores ``row_offsets``
and ``shape`` tensors; both follow from the bitmask and the spec, and on a 90 % sparse digits-mlp the offsets
alone were a tenth of the file, so they are left out.
Decoding scatters the values back, so the dense tensor is restored bit for bit (-0.0 is stored as a
zero). ``encode`` keeps a tensor dense when the bitmask form would not be smaller.

Two formats share this layout: ``sparse-bitmask`` (decoded to dense when loaded) and
``sparse-24-bitmask`` (2:4 weights; on CUDA a Linear runs torch's semi-structured sparse kernels).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from infercomp.formats.base import Format, Spec, Tensors, count_nonzero, dtype_name

PARTS = ("bitmask", "compressed")


def encoded_bytes(t: torch.Tensor) -> int:
    """Bytes the bitmask form of ``t`` takes (all parts)."""
    rows = t.shape[0]
    cols = t.numel() // max(rows, 1)
    return rows * -(-cols // 8) + count_nonzero(t) * t.element_size()


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer dtype of each width


# Values selected a block at a time: numpy.compress makes the int64 indices of the block's picks.
SELECT_BLOCK = 1 << 16


def _selected(w: torch.Tensor, nz: np.ndarray) -> torch.Tensor:
    """``w[nz]`` (row-major) through ``numpy.compress``, a block of ``SELECT_BLOCK`` values at a
    time into the result: about twice as fast as numpy's boolean indexing on a random mask, and
    neither torch's (nnz, 2) int64 index tensor (360 MB for a half-sparse 11008 x 4096 weight) nor
    compress's own (nnz,) one for the whole tensor. Dtypes numpy lacks (bfloat16, float8) go as
    integers of their width."""
    values, flags = w.view(_INTS[w.element_size()]).numpy().reshape(-1), nz.reshape(-1)
    starts = range(0, values.size, SELECT_BLOCK)
    counts = [int(np.count_nonzero(flags[i : i + SELECT_BLOCK])) for i in starts]
    picked = np.empty(sum(counts), dtype=values.dtype)
    at = 0
    for i, n in zip(starts, counts):
        np.compress(flags[i : i + SELECT_BLOCK], values[i : i + SELECT_BLOCK], out=picked[at : at + n])
        at += n
    if picked.size == 0:  # numpy gives an empty result stride 0, which torch cannot view as bytes
        return torch.empty(0, dtype=w.dtype)
    return torch.from_numpy(picked).view(w.dtype)


def _nonzero(w: torch.Tensor) -> np.ndarray:
    """``w != 0`` as a numpy bool array (-0.0 counts as zero, NaN as non-zero); numpy's compare
    where numpy has the dtype (about four times torch's single-threaded one)."""
    if w.dtype in (torch.float32, torch.float16, torch.float64):
        return w.numpy() != 0
    return (w != 0).numpy()


class SemiSparseLinear(nn.Module):
    """A Linear layer whose weight has the 2:4 pattern. On CUDA, for shapes and dtypes torch's
    semi-structured kernels accept, the weight is compressed once per device/dtype and multiplied
    sparse; everywhere else (CPU included) it runs dense ``F.linear``.

    Attributes:
        sparse_kernel: after a forward pass, whether the semi-structured kernel ran (None: not yet).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._sparse: dict[tuple[torch.device, torch.dtype], torch.Tensor | None] = {}
        self.sparse_kernel: bool | None = None

    def _compressed(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        key = (device, dtype)
        if key not in self._sparse:
            self._sparse[key] = _to_semi_structured(self.weight.detach().to(device, dtype))
        return self._sparse[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = self._compressed(x.device, x.dtype) if x.is_cuda else None
        if w is not None:
            try:
                y = F.linear(x.reshape(-1, self.in_features), w, bias)
                self.sparse_kernel = True
                return y.reshape(*x.shape[:-1], self.out_features)
            except (RuntimeError, NotImplementedError):  # no kernel for this input after all: dense from now on
                self._sparse[(x.device, x.dtype)] = None
        self.sparse_kernel = False
        return F.linear(x, self.weight.to(x.dtype), bias)


def _to_semi_structured(w: torch.Tensor) -> torch.Tensor | None:
    """``w`` as a semi-structured sparse tensor, or None where this GPU / dtype / shape has no kernel.
    float32 goes to the CUTLASS backend (cuSPARSELt has no fp32 kernel)."""
    try:
        from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

        if w.dtype == torch.float32:
            return SparseSemiStructuredTensorCUTLASS.from_dense(w)
        return to_sparse_semi_structured(w)
    except (RuntimeError, ImportError, ValueError, NotImplementedError):
        return None


def nm_fits(w: torch.Tensor, m: int) -> bool:
    """Whether the input size of ``w`` (in_features, or in_channels·kh·kw) divides into groups of ``m``."""
    return (w.numel() // w.shape[0]) % m == 0


def is_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs holds at most ``n`` non-zeros."""
    if not nm_fits(w, m):
        return False
    return bool(((w.reshape(-1, m) != 0).sum(dim=1) <= n).all())


class Bitmask(Format):
    """``sparse-bitmask``: any tensor with zeros; decoded to dense when loaded."""

    name = "sparse-bitmask"

    def keys(self, name: str, spec: Spec) -> list[str]:
        del spec
        return [f"{name}.{p}" for p in PARTS]

    def encode(
        self, name: str, t: torch.Tensor, *, force: bool = False, extra: Spec | None = None, keep: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], Spec | None]:
        """Stored tensors and the spec for ``t`` (``extra`` fields are added to the spec);
        ``({name: t}, None)`` (stored dense) when the bitmask form is not smaller, unless ``force``.
        ``keep``: a bool mask of ``t``'s shape: the tensor encoded is ``t * keep`` (pruning), taken
        from ``t`` without making it."""
        w = t.detach().cpu().contiguous().reshape(t.shape[0], -1)  # (rows, cols)
        nz = _nonzero(w)
        if keep is not None:
            np.logical_and(nz, keep.reshape(nz.shape).numpy(), out=nz)
        nnz = int(np.count_nonzero(nz))
        if not force and w.shape[0] * -(-w.shape[1] // 8) + nnz * t.element_size() >= t.numel() * t.element_size():
            return {name: t if keep is None else t * keep}, None
        bits = np.packbits(nz, axis=1, bitorder="little")
        values = _selected(w, nz)
        stored = {f"{name}.bitmask": torch.from_numpy(bits), f"{name}.compressed": values}
        spec = {**(extra or {}), "codec": self.name, "shape": list(t.shape), "dtype": dtype_name(t.dtype), "nnz": nnz}
        return stored, spec

    def decode(self, tensors: Tensors, name: str, spec: Spec) -> torch.Tensor:
        """The dense tensor (logical shape and dtype) from its bitmask parts."""
        shape = [int(s) for s in spec["shape"]]
        rows = shape[0]
        cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        bits = tensors[f"{name}.bitmask"].numpy()
        mask = torch.from_numpy(np.unpackbits(bits, axis=1, count=cols, bitorder="little").astype(bool))  # (rows, cols)
        values = tensors[f"{name}.compressed"]
        ints = _INTS[values.element_size()]  # scattered as integers: float8 has no masked fill; 0 bits are 0.0
        out = torch.zeros(rows, cols, dtype=ints)
        out[mask] = values.view(ints)
        return out.view(values.dtype).reshape(shape)


class Bitmask24(Bitmask):
    """``sparse-24-bitmask``: 2:4 weights (always stored sparse); on CUDA a Linear runs torch's
    semi-structured sparse kernels."""

    name = "sparse-24-bitmask"

    def encode(
        self, name: str, t: torch.Tensor, *, force: bool = True, extra: Spec | None = None, keep: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], Spec | None]:
        return super().encode(name, t, force=force, extra=extra, keep=keep)

    def runtime(self, old: nn.Module, tensors: Tensors, name: str, spec: Spec) -> nn.Module | None:
        weight = self.decode(tensors, name, spec)
        bias = tensors.get(name.removesuffix("weight") + "bias")
        if isinstance(old, nn.Linear):
            return SemiSparseLinear(weight, None if bias is None else bias.clone())
        return None  # a conv: decoded and loaded like any dense weight


BITMASK = Bitmask()
BITMASK_24 = Bitmask24()
