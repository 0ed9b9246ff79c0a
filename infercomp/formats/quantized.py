"""Quantized weight formats: ``int8``, ``int8-dynamic``, ``int4`` and ``fp8``.

| format        | stored tensors of ``<m>.weight``                                            | runs as |
|---------------|------------------------------------------------------------------------------|---------|
| int8          | ``<m>.weight`` int8 (out, in), ``<m>.weight_scale`` (out, groups) [, ``<m>.weight_column_scale`` (in,)] | weight-only int8 |
| int8-dynamic  | same as int8 (per channel)                                                   | int8 x int8 kernels, activations quantized per call (``--compute int8``; ``auto`` may pick it) |
| int4          | ``<m>.weight_packed`` uint8 (two per byte), ``<m>.weight_scale``, ``<m>.weight_zero_point`` (asymmetric) [, ``<m>.weight_column_scale``] | weight-only int4 |
| fp8           | ``<m>.weight`` float8_e4m3fn, ``<m>.weight_scale`` (out, 1)                  | fp8 matmul on CUDA >= sm89, else dequantized |
| pack-quantized | ``<m>.weight_packed`` int32, ``<m>.weight_scale``, ``<m>.weight_shape`` int64 [, ``<m>.weight_zero_point`` int32] | as int4 / int8 (converted once at load) |

Names follow the compressed-tensors format where it has an equivalent. ``pack-quantized`` IS
compressed-tensors' layout for weight-only int4 / int8 (what transformers and vLLM read): the
Hugging Face directory output converts int4 / int8 to it (``PackQuantized.from_ours``). The integer formats are
encoded from a ``grid.Quantized`` (the quantizer — RTN or GPTQ — chooses the integers; this module
only stores them), fp8 from the dense weight.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import infercomp.formats.grid as grid
from infercomp.formats.base import Format, Spec, Tensors, count_nonzero, dtype_name, spec_dtype
from infercomp.formats.qmodules import SMALL_LAYER, QuantEmbedding, QuantLinear, column_scale_of, stored_weight


def _base_spec(codec: str, shape: torch.Size | list[int], dtype: torch.dtype) -> Spec:
    return {"codec": codec, "shape": list(shape), "dtype": dtype_name(dtype)}


class _Quantized(Format):
    """Shared by the quantized formats: the runtime module that replaces a layer."""

    stored_as = ""  # the storage kind of the runtime weight (int8-dynamic is stored as int8)

    def runtime(self, old: nn.Module, tensors: Tensors, name: str, spec: Spec) -> nn.Module | None:
        bias = tensors.get(name.removesuffix("weight") + "bias")
        if type(old) is nn.Embedding and old.max_norm is None:  # max_norm renormalises rows in place
            return QuantEmbedding(stored_weight(self.stored_as, tensors, name, spec), old)
        linear = type(old) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
        if not linear or (self.name != "fp8" and old.in_features * old.out_features <= SMALL_LAYER):  # fp8: for its GPU matmul
            return None  # small Linear layers, convolutions, custom layers: decoded once, run in float
        return QuantLinear(stored_weight(self.stored_as, tensors, name, spec), bias)


class Int8(_Quantized):
    """Symmetric int8 weights, a scale per output channel or per group of columns."""

    name = "int8"
    stored_as = "int8"

    def keys(self, name: str, spec: Spec) -> list[str]:
        keys = [name, f"{name}_scale"]
        return [*keys, f"{name}_column_scale"] if spec.get("column_scale") else keys

    def encode(
        self, name: str, qz: grid.Quantized, *, shape: torch.Size, dtype: torch.dtype, group_size: int | None, method: str = "rtn"
    ) -> tuple[dict[str, torch.Tensor], Spec]:
        """Store integers ``qz.q`` (out, in) with their scales; ``shape`` / ``dtype`` are the
        logical weight's, ``group_size`` the columns per scale (None: per channel), ``method`` the
        quantizer that chose the integers (recorded)."""
        stored = {self._data_key(name): self._data(qz), f"{name}_scale": qz.scale}
        if qz.zero_point is not None:
            stored[f"{name}_zero_point"] = qz.zero_point
        if qz.column_scale is not None:
            stored[f"{name}_column_scale"] = qz.column_scale
        spec = _base_spec(self.name, shape, dtype)
        spec.update(
            bits=self.bits,
            symmetric=qz.zero_point is None,
            granularity="channel" if group_size is None else "group",
            group_size=group_size,
            method=method,
        )
        if qz.column_scale is not None:
            spec["column_scale"] = True
        return stored, spec

    bits = 8

    def _data_key(self, name: str) -> str:
        return name

    def _data(self, qz: grid.Quantized) -> torch.Tensor:
        return qz.q

    def _ints(self, tensors: Tensors, name: str, spec: Spec) -> torch.Tensor:
        return tensors[name].reshape(spec["shape"][0], -1)

    def decode(self, tensors: Tensors, name: str, spec: Spec) -> torch.Tensor:
        zp = None if spec.get("symmetric", True) else tensors[f"{name}_zero_point"]
        w = grid.dequantize(
            self._ints(tensors, name, spec), tensors[f"{name}_scale"], zp, column_scale=column_scale_of(tensors, name, spec)
        )
        return w.reshape(spec["shape"]).to(spec_dtype(spec))

    def nonzero(self, tensors: Tensors, name: str, spec: Spec) -> int | None:
        """Integers off their zero point: each decodes to (q - zp) * scale [* column scale], and
        those factors are at least 1e-12 and 2**-9, so in float32 (and bfloat16, the same range)
        the product is never 0. float16 could underflow: decoded there."""
        if spec_dtype(spec) not in (torch.float32, torch.bfloat16):
            return None
        q = self._ints(tensors, name, spec)  # (out, in)
        if q.numel() != math.prod(spec["shape"]):
            raise ValueError(f"{q.numel()} stored integers for shape {spec['shape']}")
        if spec.get("symmetric", True):
            return count_nonzero(q)
        zp = tensors[f"{name}_zero_point"].reshape(q.shape[0], -1)  # (out, groups)
        return count_nonzero(q.reshape(q.shape[0], zp.shape[1], -1) != zp.unsqueeze(-1))

    def version(self, spec: Spec) -> int:
        return 2 if spec.get("column_scale") else 1  # format 2 added column scales


class Int8Dynamic(Int8):
    """Stored exactly as ``int8`` per channel; marks a model meant to run int8 x int8 with
    activations quantized per call, so ``--compute auto`` may choose the int8 kernels for it."""

    name = "int8-dynamic"


class Int4(Int8):
    """4-bit weights, two per byte (column 2j in the low nibble), per group of columns; symmetric
    values [-8, 7] are stored offset by 8."""

    name = "int4"
    stored_as = "int4"
    bits = 4

    def keys(self, name: str, spec: Spec) -> list[str]:
        keys = [f"{name}_packed", f"{name}_scale"]
        if not spec.get("symmetric", True):
            keys.append(f"{name}_zero_point")
        return [*keys, f"{name}_column_scale"] if spec.get("column_scale") else keys

    def _data_key(self, name: str) -> str:
        return f"{name}_packed"

    def _data(self, qz: grid.Quantized) -> torch.Tensor:
        return grid.pack_int4(qz.q, qz.zero_point is None)

    def _ints(self, tensors: Tensors, name: str, spec: Spec) -> torch.Tensor:
        return grid.unpack_int4(tensors[f"{name}_packed"], spec.get("symmetric", True))

    def nonzero(self, tensors: Tensors, name: str, spec: Spec) -> int | None:
        """Symmetric: the nibbles other than 8 (the stored form of 0), counted in the packed bytes
        without unpacking them; else as ``Int8.nonzero``."""
        if not spec.get("symmetric", True) or spec_dtype(spec) not in (torch.float32, torch.bfloat16):
            return super().nonzero(tensors, name, spec)
        packed = tensors[f"{name}_packed"].numpy()
        if packed.dtype != np.uint8 or packed.size * 2 != math.prod(spec["shape"]):
            raise ValueError(f"{packed.size} packed {packed.dtype} bytes for shape {spec['shape']}")
        return packed.size * 2 - int(np.count_nonzero((packed & 0x0F) == 8)) - int(np.count_nonzero((packed >> 4) == 8))


class Fp8(_Quantized):
    """float8 e4m3 weights with one float32 scale per output channel."""

    name = "fp8"
    stored_as = "fp8"

    def keys(self, name: str, spec: Spec) -> list[str]:
        del spec
        return [name, f"{name}_scale"]

    def encode(self, name: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], Spec]:
        q, scale = grid.quantize_fp8(w)
        spec = {**_base_spec(self.name, w.shape, w.dtype), "granularity": "channel"}
        return {name: q, f"{name}_scale": scale}, spec

    def decode(self, tensors: Tensors, name: str, spec: Spec) -> torch.Tensor:
        w = grid.dequantize_fp8(tensors[name].reshape(spec["shape"][0], -1), tensors[f"{name}_scale"])
        return w.reshape(spec["shape"]).to(spec_dtype(spec))


class PackQuantized(Format):
    """compressed-tensors' ``pack-quantized``: weight-only int4 / int8 integers packed into int32
    words (``grid.pack_int32``) as unsigned values (symmetric ones offset by 2**(bits-1)); an
    asymmetric zero point (out, groups) is packed the same way along the output dimension.
    Dequantized as (u - zp) * scale, the same numbers as our ``int4`` / ``int8`` stored them."""

    name = "pack-quantized"

    def keys(self, name: str, spec: Spec) -> list[str]:
        keys = [f"{name}_packed", f"{name}_scale", f"{name}_shape"]
        return keys if spec.get("symmetric", True) else [*keys, f"{name}_zero_point"]

    def from_ours(self, tensors: Tensors, name: str, spec: Spec) -> tuple[dict[str, torch.Tensor], Spec]:
        """Our ``int4`` / ``int8`` tensor ``name`` (without column scales) in this layout."""
        ours: Int8 = INT4 if spec["codec"] == "int4" else INT8
        bits, sym = ours.bits, spec.get("symmetric", True)
        offset = 1 << (bits - 1)
        q = ours._ints(tensors, name, spec).to(torch.int16)  # (out, in): signed if symmetric, else [0, 2**bits)
        stored = {
            f"{name}_packed": grid.pack_int32(q + offset if sym else q, bits),
            f"{name}_scale": tensors[f"{name}_scale"],
            f"{name}_shape": torch.tensor(spec["shape"][:2], dtype=torch.int64),
        }
        if not sym:
            stored[f"{name}_zero_point"] = grid.pack_int32(tensors[f"{name}_zero_point"].to(torch.int16).t(), bits).t().contiguous()
        keep = ("shape", "dtype", "symmetric", "granularity", "group_size", "method")
        return stored, {"codec": self.name, "bits": bits, **{k: spec[k] for k in keep if k in spec}}

    def to_ours(self, tensors: Tensors, name: str, spec: Spec) -> tuple[dict[str, torch.Tensor], Spec]:
        """The inverse of ``from_ours``."""
        bits, sym = spec["bits"], spec.get("symmetric", True)
        out, cols = spec["shape"][0], spec["shape"][1]
        u = grid.unpack_int32(tensors[f"{name}_packed"], bits, cols)
        q = (u - (1 << (bits - 1)) if sym else u).to(torch.int8)
        ours: Int8 = INT4 if bits == 4 else INT8
        stored = {ours._data_key(name): grid.pack_int4(q, sym) if bits == 4 else q, f"{name}_scale": tensors[f"{name}_scale"]}
        if not sym:
            groups = tensors[f"{name}_zero_point"].shape[1]
            stored[f"{name}_zero_point"] = grid.unpack_int32(tensors[f"{name}_zero_point"].t(), bits, out).t().to(torch.int8)
            stored[f"{name}_zero_point"] = stored[f"{name}_zero_point"].reshape(out, groups).contiguous()
        return stored, {**spec, "codec": ours.name}

    def decode(self, tensors: Tensors, name: str, spec: Spec) -> torch.Tensor:
        stored, ours = self.to_ours(tensors, name, spec)
        return FORMATS_BY_BITS[spec["bits"]].decode(stored, name, ours)

    def nonzero(self, tensors: Tensors, name: str, spec: Spec) -> int | None:
        stored, ours = self.to_ours(tensors, name, spec)
        return FORMATS_BY_BITS[spec["bits"]].nonzero(stored, name, ours)

    def runtime(self, old: nn.Module, tensors: Tensors, name: str, spec: Spec) -> nn.Module | None:
        stored, ours = self.to_ours(tensors, name, spec)
        bias = name.removesuffix("weight") + "bias"
        if bias in tensors:
            stored[bias] = tensors[bias]
        return FORMATS_BY_BITS[spec["bits"]].runtime(old, stored, name, ours)

    def version(self, spec: Spec) -> int:
        del spec
        return 3  # format 3 added pack-quantized


INT8 = Int8()
INT8_DYNAMIC = Int8Dynamic()
INT4 = Int4()
FP8 = Fp8()
PACK_QUANTIZED = PackQuantized()
FORMATS_BY_BITS: dict[int, Int8] = {4: INT4, 8: INT8}
