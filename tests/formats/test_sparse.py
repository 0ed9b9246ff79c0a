"""formats/sparse.py: the bitmask layout (sparse-bitmask, sparse-24-bitmask) and SemiSparseLinear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import infercomp.formats as formats
from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.formats import FORMATS
from infercomp.formats.sparse import BITMASK, BITMASK_24, SemiSparseLinear, encoded_bytes, is_nm
from infercomp.prune import nm_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 13), (6, 3, 3, 3), (1, 8), (3, 1)])
def test_bitmask_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...], tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) < 0.6] = 0
    stored, spec = BITMASK.encode("layer.weight", w, force=True)
    assert spec is not None and set(stored) == {"layer.weight.bitmask", "layer.weight.compressed"}
    assert set(BITMASK.keys("layer.weight", spec)) == set(stored)
    assert torch.equal(BITMASK.decode(stored, "layer.weight", spec), w)
    path = tmp_path / "w.safetensors"
    checkpoint.save(Checkpoint(tensors=stored, encodings={"layer.weight": spec}), path)
    back = checkpoint.load(path)
    got = formats.logical_tensors(back.tensors, back.encodings)["layer.weight"]
    assert got.dtype == dtype and torch.equal(got, w)


def test_bitmask_bits_are_little_endian_along_each_row() -> None:
    """compressed-tensors' layout: bit j % 8 of byte j // 8 marks W[r, j]; values in row-major order."""
    w = torch.zeros(2, 9)
    w[0, 1], w[0, 8], w[1, 0] = 2.0, 3.0, -1.0
    stored, spec = BITMASK.encode("w", w, force=True)
    assert stored["w.bitmask"].dtype == torch.uint8 and stored["w.bitmask"].tolist() == [[0b10, 0b1], [0b1, 0]]
    assert stored["w.compressed"].tolist() == [2.0, 3.0, -1.0] and spec["nnz"] == 3
    assert spec["codec"] == "sparse-bitmask" and spec["shape"] == [2, 9] and spec["dtype"] == "float32"


def test_dense_storage_is_kept_when_the_bitmask_is_not_smaller() -> None:
    w = torch.randn(8, 8)
    stored, spec = BITMASK.encode("w", w)
    assert spec is None and stored["w"] is w
    w[:, :2] = 0  # 25 % zeros: 1 bit + 0.75 · 32 bits < 32 bits per weight
    assert BITMASK.encode("w", w)[1] is not None


def test_encoded_bytes_counts_the_mask_and_the_values() -> None:
    w = torch.zeros(4, 20)
    w[:, :5] = 1.0
    assert encoded_bytes(w) == 4 * 3 + 20 * 4  # ceil(20 / 8) mask bytes per row, 20 float32 values
    assert encoded_bytes(w.half()) == 4 * 3 + 20 * 2


def test_two_four_round_trip_records_its_pattern() -> None:
    w = torch.randn(8, 16).half() * nm_mask(torch.rand(8, 16), 2, 4)
    stored, spec = BITMASK_24.encode("fc.weight", w, extra={"pattern": "2:4"})
    assert spec is not None and spec["codec"] == "sparse-24-bitmask" and spec["pattern"] == "2:4"
    assert set(stored) == set(BITMASK_24.keys("fc.weight", spec)) == {"fc.weight.bitmask", "fc.weight.compressed"}
    back = FORMATS["sparse-24-bitmask"].decode(stored, "fc.weight", spec)
    assert torch.equal(back, w) and is_nm(back, 2, 4)


def test_two_four_linear_runs_as_semi_sparse_and_conv_decodes() -> None:
    w = torch.randn(8, 16) * nm_mask(torch.rand(8, 16), 2, 4)
    stored, spec = BITMASK_24.encode("fc.weight", w)
    bias = torch.randn(8)
    mod = BITMASK_24.runtime(nn.Linear(16, 8), {**stored, "fc.bias": bias}, "fc.weight", spec)
    assert isinstance(mod, SemiSparseLinear) and torch.equal(mod.weight, w) and torch.equal(mod.bias, bias)
    x = torch.randn(3, 16)
    torch.testing.assert_close(mod(x), nn.functional.linear(x, w, bias))
    conv_w = torch.randn(8, 4, 2, 2) * nm_mask(torch.rand(8, 4, 2, 2), 2, 4)
    conv_stored, conv_spec = BITMASK_24.encode("c.weight", conv_w)
    assert BITMASK_24.runtime(nn.Conv2d(4, 8, 2), conv_stored, "c.weight", conv_spec) is None
    assert BITMASK.runtime(nn.Linear(16, 8), stored, "fc.weight", {**spec, "codec": "sparse-bitmask"}) is None  # decoded at load


def test_semi_sparse_linear_runs_dense_on_cpu() -> None:
    w = torch.randn(8, 16) * nm_mask(torch.rand(8, 16), 2, 4)
    layer = SemiSparseLinear(w, torch.randn(8))
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w, layer.bias))
    assert layer.sparse_kernel is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_sparse_linear_uses_the_sparse_kernel_on_cuda() -> None:
    w = (torch.randn(128, 128) * nm_mask(torch.rand(128, 128), 2, 4)).cuda().half()
    layer = SemiSparseLinear(w, None)
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    y = layer(x)
    if layer.sparse_kernel:
        torch.testing.assert_close(y, x @ w.t(), rtol=1e-2, atol=1e-2)
    else:
        pytest.skip("this GPU has no semi-structured sparse kernel")


@pytest.mark.parametrize("kept", [0, 1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float64])
def test_bitmask_of_few_or_no_non_zeros_writes_and_reads_back(kept: int, dtype: torch.dtype, tmp_path: Path) -> None:
    """The values are picked through numpy (as integers of the dtype's width where numpy lacks it):
    an empty pick must still be a tensor safetensors can write."""
    w = torch.zeros(4, 16)
    w.view(-1)[torch.randperm(64, generator=torch.Generator().manual_seed(kept))[:kept]] = torch.arange(1, kept + 1).float() / 8
    w = w.to(dtype)
    stored, spec = BITMASK.encode("w", w, force=True)
    assert spec is not None and spec["nnz"] == kept and stored["w.compressed"].dtype == dtype
    path = tmp_path / "few.safetensors"
    checkpoint.save(Checkpoint(tensors=stored, encodings={"w": spec}), path)
    back = checkpoint.load(path)
    assert torch.equal(formats.logical_tensors(back.tensors, back.encodings, "few")["w"].float(), w.float())


@pytest.mark.parametrize("fmt", [BITMASK, BITMASK_24])
@pytest.mark.parametrize("dropped", [0.5, 0.01])  # 1 %: not smaller as a bitmask, stored dense (plain bitmask)
def test_encoding_with_a_keep_mask_is_encoding_the_zeroed_weight(fmt, dropped: float) -> None:
    """Pruning hands the encoder the weight and its keep-mask instead of making ``w * mask``:
    the same stored tensors, -0.0 of negative dropped weights included."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    w[0, :4] = 0.0
    w[1, :4] = -0.0
    keep = torch.rand(16, 64, generator=g) >= dropped
    a, spec_a = fmt.encode("w", w, keep=keep)
    b, spec_b = fmt.encode("w", w * keep)
    assert spec_a == spec_b and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert (spec_a is None) == (fmt is BITMASK and dropped < 0.1)
