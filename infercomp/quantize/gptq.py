"""GPTQ: quantize a weight matrix column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's output error
(H = 2 X^T X over calibration inputs X). Frantar et al., 2022 (arXiv:2210.17323).

Layers are done in the order the model defines them; each layer's Hessian is collected with the
layers before it already quantized, so later layers correct for the error of earlier ones (a
Hugging Face causal LM goes one block at a time, ``infercomp.blocks``: the same order and inputs).
Linear and (ungrouped) Conv2d layers are handled (``infercomp.hessian`` collects H); other
tensors use RTN.
"""

from __future__ import annotations

import torch

import infercomp.formats.grid as grid
import infercomp.hessian as hessian
from infercomp.formats.grid import IntFormat, Quantized

BLOCK = 128  # columns updated together before the lazy batch update of the rest


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: IntFormat, group_size: int | None) -> Quantized:
    """Quantize ``w`` (out, ...) given the Hessian ``h`` (in, in) of its flattened input.

    Group scales (and zero points) are set when the sweep reaches each group, from the weights as
    updated so far; per-channel scales come from the original rows."""
    wr = grid.rows(w).clone()
    out, n = wr.shape
    hinv = hessian.inverse_factor(h)  # inputs never seen in calibration: their weights rounded plainly

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
