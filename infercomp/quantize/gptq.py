"""GPTQ: quantize a weight matrix column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's output error
(H = 2 X^T X over calibration inputs X). Frantar et al., 2022 (arXiv:2210.17323).

Layers are done in the order the model defines them; each layer's Hessian is collected with the
layers before it already quantized, so later layers correct for the error of earlier ones (a
Hugging Face causal LM goes one block at a time, ``infercomp.blocks``: the same order and inputs).
Linear and (ungrouped) Conv2d layers are handled (a convolution is a matmul over its unfolded
input patches, whose column order matches ``weight.reshape(out, -1)``); other tensors use RTN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import infercomp.formats.grid as grid
from infercomp.formats.grid import IntFormat, Quantized

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (numerical stability)
BLOCK = 128  # columns updated together before the lazy batch update of the rest


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    # F.unfold (used to build the conv's input columns) takes numeric padding only, not 'same'/'valid'.
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the matmul it performs: (rows, in_features)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def hessian(model: Callable[[Any], Any], module: nn.Module, batches: Iterable[Any]) -> tuple[torch.Tensor, int]:
    """2/n * X^T X of ``module``'s inputs over the calibration batches; the forward pass stops at
    the module. ``model(batch)`` runs one batch: the model on its inputs, or one block of it on
    batch ``i`` (``blocks.Stage.run``). Returns (H, n) with n the number of input rows seen (0: the
    module never ran)."""
    cols = module.weight[0].numel()
    h = torch.zeros(cols, cols, dtype=torch.float32)
    n = 0

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal h, n
        x = _columns(module, args[0].detach().float().cpu())
        k = x.shape[0]
        h *= n / (n + k)
        n += k
        x = x * (2.0 / n) ** 0.5
        h += x.T @ x
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for xb in batches:
            try:
                model(xb)
            except _Stop:
                pass
    finally:
        handle.remove()
    return h, n


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: IntFormat, group_size: int | None) -> Quantized:
    """Quantize ``w`` (out, ...) given the Hessian ``h`` (in, in) of its flattened input.

    Group scales (and zero points) are set when the sweep reaches each group, from the weights as
    updated so far; per-channel scales come from the original rows."""
    wr = grid.rows(w).clone()
    out, n = wr.shape
    h = h.clone()
    # Inputs that were always zero in calibration (e.g. blank border pixels): no information, so
    # a unit diagonal; their weights are rounded plainly (they may be non-zero on other data).
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += torch.eye(n) * (DAMP * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    g = n if group_size is None else group_size
    scales = torch.zeros(out, n // g)
    zps = None if fmt.symmetric else torch.zeros(out, n // g, dtype=torch.int8)
    q_all = torch.zeros(out, n, dtype=torch.int8)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        wb = wr[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % g == 0:  # entering a new group: its scale from the current weights
                gi = col // g
                grp = torch.cat([wb[:, j:], wr[:, b1:]], dim=1)[:, :g] if col + g > b1 else wb[:, j : j + g]
                s, z = grid.group_params(grp, fmt)
                scales[:, gi] = s.float()
                if zps is not None and z is not None:
                    zps[:, gi] = z
            gi = col // g
            wcol = wb[:, j]
            qcol = grid.quantize_groups(wcol[:, None], scales[:, gi], None if zps is None else zps[:, gi], fmt)[:, 0]
            q_all[:, col] = qcol
            zp = 0.0 if zps is None else zps[:, gi].float()
            deq = (qcol.float() - zp) * scales[:, gi]
            e = (wcol - deq) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        wr[:, b1:] -= err @ hinv[b0:b1, b1:]
    # Each group's scale was rounded to float16 when it fits there (see grid.storable_scale).
    return Quantized(q=q_all, scale=scales.half() if _all_fp16(scales) else scales, zero_point=zps)


def _all_fp16(scales: torch.Tensor) -> bool:
    return bool(((scales >= grid.FP16_NORMAL_MIN) & (scales <= grid.FP16_MAX)).all())
