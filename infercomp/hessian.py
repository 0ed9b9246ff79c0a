"""Second-order statistics of a layer's inputs, shared by the methods that minimise a layer's
output error ||W X - W' X||² rather than the weights' own error: GPTQ (``quantize.gptq``) and
SparseGPT (``prune.sparsegpt``). H = 2 X^T X over the calibration inputs X that reach the layer,
and the upper Cholesky factor of its damped inverse, which both sweep column by column.

Linear and (ungrouped) Conv2d layers are handled: a convolution is a matmul over its unfolded
input patches, whose column order matches ``weight.reshape(out, -1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (numerical stability)


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def supported(module: nn.Module) -> bool:
    """Whether ``collect`` can see ``module``'s input as the rows of a matmul by its weight."""
    if type(module) is nn.Linear:
        return True
    # F.unfold (used to build the conv's input columns) takes numeric padding only, not 'same'/'valid'.
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


def columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the matmul it performs: (rows, in_features)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect(model: Callable[[Any], Any], module: nn.Module, batches: Iterable[Any]) -> tuple[torch.Tensor, int]:
    """2/n * X^T X of ``module``'s inputs over the calibration batches; the forward pass stops at
    the module. ``model(batch)`` runs one batch: the model on its inputs, or one block of it on
    batch ``i`` (``blocks.Stage.run``). Returns (H, n) with n the number of input rows seen (0: the
    module never ran)."""
    cols = module.weight[0].numel()
    h = torch.zeros(cols, cols, dtype=torch.float32)
    n = 0

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal h, n
        x = columns(module, args[0].detach().float().cpu())
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


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of the damped H^-1 (U^T U = H^-1): row j of U holds how the error
    made on column j spreads over the columns after it. Inputs that were always zero in
    calibration (e.g. blank border pixels) carry no information: they get a unit diagonal, so
    their weights are treated on their own (they may be non-zero on other data)."""
    n = h.shape[0]
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += torch.eye(n) * (DAMP * torch.diag(h).mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
