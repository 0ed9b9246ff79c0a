"""SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): prune a weight matrix column by column
and, as each weight is removed, move its contribution onto the weights of the same row not yet
reached, weighted by the inverse Hessian of the layer's output error (H = 2 X^T X over the
calibration inputs, ``infercomp.hessian``). Wanda only chooses which weights to zero; SparseGPT
also updates the ones it keeps, so the layer's outputs on the calibration data stay closer.

The mask is chosen a block of ``BLOCK`` columns at a time from the weights as updated so far,
smallest w² / [H^-1]_jj² first: per row within each block (every row keeps the same share), or
for N:M among each M consecutive columns when the sweep reaches them.
"""

from __future__ import annotations

import torch

import infercomp.hessian as hessian

BLOCK = 128  # columns whose mask is chosen together; also the lazy batch update's width


def sparsegpt(
    w: torch.Tensor, h: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``w`` (out, ...) given the Hessian ``h`` (in, in) of its flattened input.

    Returns (the updated weight, zeros where pruned, float32 in ``w``'s shape; the keep-mask, bool).
    Unstructured: each row loses round(in · sparsity) weights (rounded block by block). N:M
    (``pattern``): N of every M consecutive inputs are kept, M must divide the input size."""
    wr = w.detach().reshape(w.shape[0], -1).float().clone()
    out, n = wr.shape
    if pattern is not None and n % pattern[1]:
        raise ValueError(f"N:M pruning needs an input size divisible by {pattern[1]}, got {n}")
    hinv = hessian.inverse_factor(h)
    keep = torch.ones(out, n, dtype=torch.bool)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        wb = wr[:, b0:b1]  # a view: updated in place
        hb = hinv[b0:b1, b0:b1]
        d = torch.diag(hb)
        kb = keep[:, b0:b1]
        if pattern is None:
            k = round(b1 * sparsity) - round(b0 * sparsity)  # cumulative rounding: rows end at round(n * s)
            if k:
                idx = (wb.pow(2) / d.pow(2)).argsort(dim=1, stable=True)[:, :k]
                kb.scatter_(1, idx, False)
        err = torch.zeros_like(wb)
        for j in range(b1 - b0):
            if pattern is not None and j % pattern[1] == 0:
                nn_, m = pattern
                score = wb[:, j : j + m].pow(2) / d[j : j + m].pow(2)
                kb[:, j : j + m].scatter_(1, score.argsort(dim=1, stable=True)[:, : m - nn_], False)
            col = wb[:, j]
            q = torch.where(kb[:, j], col, torch.zeros_like(col))
            e = (col - q) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            wb[:, j] = q  # exactly zero where pruned
            err[:, j] = e
        wr[:, b1:] -= err @ hinv[b0:b1, b1:]
    return wr.reshape(w.shape), keep.reshape(w.shape)
