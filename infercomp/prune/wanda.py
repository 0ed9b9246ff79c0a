"""Wanda importance (Sun et al., 2023): score(w_ij) = |w_ij| · ||x_j||_2, where x_j is input
feature j of the layer over the calibration data (all samples and positions); the mask
refinement that follows it by default (``refine_mask``: swaps of pruned and kept weights that
lower the layer's output error, the weights themselves unchanged); and the bias correction
``--bias-correction`` adds after it (``bias_shift``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

import infercomp.hessian as hessian
from infercomp.errors import ModelError

GRAM_VALUES = 1 << 24  # a conv's unfolded patches held at once, at most (about; one sample at least)


def input_norms(
    model: nn.Module,
    names: Iterable[str],
    inputs: torch.Tensor,
    *,
    batch_size: int = 128,
    attention_mask: torch.Tensor | None = None,
    means: dict[str, torch.Tensor] | None = None,
    grams: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """||x_j||_2 of every input feature of the named Linear / Conv modules, from forward hooks
    while ``inputs`` run through ``model``. Linear: (in_features,); Conv: (in_channels,).
    ``means`` / ``grams``: filled with each feature's mean / each layer's input second moments
    too (``norms_of``; over the real tokens where ``attention_mask`` marks them)."""
    run, positions = batch_runner(
        lambda i: model(inputs[i * batch_size : (i + 1) * batch_size]), range(-(-len(inputs) // batch_size)), batch_size, attention_mask
    )
    return norms_of({n: model.get_submodule(n) for n in names}, run, means=means, grams=grams, positions=positions)


def batch_runner(
    run_batch: Callable[[int], object], batches: Iterable[int], batch_size: int, attention_mask: torch.Tensor | None
) -> tuple[Callable[[], None], Callable[[], torch.Tensor | None]]:
    """(run every batch, the (batch, tokens) real-token mask of the batch running: rows
    ``i * batch_size`` on of ``attention_mask``, or None without one), for ``norms_of``."""
    current: list[torch.Tensor | None] = [None]

    def run() -> None:
        for i in batches:
            current[0] = None if attention_mask is None else attention_mask[i * batch_size : (i + 1) * batch_size].bool()
            run_batch(i)

    return run, lambda: current[0]


def norms_of(
    modules: dict[str, nn.Module],
    run: Callable[[], object],
    *,
    means: dict[str, torch.Tensor] | None = None,
    grams: dict[str, torch.Tensor] | None = None,
    positions: Callable[[], torch.Tensor | None] = lambda: None,
) -> dict[str, torch.Tensor]:
    """``input_norms`` of ``modules`` (name -> Linear / Conv) over whatever ``run()`` runs through
    them (the whole model, or one block at a time: ``infercomp.blocks``). ``means``: filled with
    each input feature's mean, over the positions ``positions()`` marks in the batch running
    (a (batch, tokens) bool mask of the real tokens; None: all of them). ``grams``: filled with
    E[x xᵀ] over the same positions, x the layer's input as the rows of its matmul
    (``hessian.columns``), for the layers ``hessian.supported`` takes (``refine_mask``)."""
    sums: dict[str, torch.Tensor] = {}
    firsts: dict[str, torch.Tensor] = {}
    seconds: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    rows: dict[str, int] = {}
    hooks = []

    def real_rows(x: torch.Tensor) -> torch.Tensor:
        """A Linear's input as (tokens, in), padding left out: its activations are not the
        layer's usual input."""
        real = positions()
        if real is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(real.shape):
            return x[real]
        return x.reshape(-1, x.shape[-1])

    def hook(name: str, module: nn.Module):
        conv = isinstance(module, nn.modules.conv._ConvNd)
        gram = grams is not None and hessian.supported(module)

        def fn(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            # Conv (N, C, ...): sum over all but C; Linear (..., in): sum over all but the last dim.
            sq = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1) if conv else x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
            if means is not None:
                if conv:
                    total, n = x.transpose(0, 1).reshape(x.shape[1], -1).sum(1), x.numel() // x.shape[1]
                else:
                    flat = real_rows(x)
                    total, n = flat.sum(0), flat.shape[0]
                firsts[name] = firsts[name] + total if name in firsts else total
                counts[name] = counts.get(name, 0) + n
            if gram:
                # A conv's unfolded patches are kh·kw times its input: a few samples at a time.
                step = max(1, GRAM_VALUES // max(x[:1].numel() * module.weight[0, 0].numel(), 1)) if conv else max(len(x), 1)
                for i in range(0, len(x), step):
                    cols = hessian.columns(module, x[i : i + step]) if conv else real_rows(x)
                    xx = cols.T @ cols
                    seconds[name] = seconds[name] + xx if name in seconds else xx
                    rows[name] = rows.get(name, 0) + cols.shape[0]

        return fn

    for name, module in modules.items():
        hooks.append(module.register_forward_pre_hook(hook(name, module)))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in modules if n not in sums]
    if missing:
        raise ModelError(f"layer {missing[0]!r} never ran on the calibration data; exclude it with --exclude {missing[0]}")
    if means is not None:
        means.update({n: firsts[n] / max(counts[n], 1) for n in firsts})
    if grams is not None:
        grams.update({n: xx / max(rows[n], 1) for n, xx in seconds.items()})
    return {n: s.sqrt() for n, s in sums.items()}


def bias_shift(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """What the removed weights added to each output on average: (W ⊙ ¬keep) · E[x], with E[x]
    the layer's mean input feature (a conv's channel mean covers its kh·kw taps). Added to the
    bias, the pruned layer's mean output over the calibration data is the dense layer's again
    (bias correction, as for quantization in Nagel et al., 2019)."""
    removed = weight.detach().float() * ~keep
    return removed.reshape(removed.shape[0], removed.shape[1], -1).sum(-1) @ mean


def wanda_scores(weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|W| · ||x|| broadcast along the input dimension (a conv's channel norm covers its kh·kw taps)."""
    out = {}
    for name, w in weights.items():
        x = norms[name.rpartition(".")[0]]
        shape = [1, -1] + [1] * (w.dim() - 2)  # (1, in, 1, 1) for conv, (1, in) for linear
        out[name] = w.abs().float() * x.reshape(shape)
    return out


REFINE_STEPS = 100  # swaps per row at most; MiniLM's rows settle within 85 (unstructured), 2:4 ones keep gaining a little
REFINE_VALUES = 1 << 22  # rows refined together: bounded temporaries (rows * inputs values each)


@dataclass(frozen=True)
class Refined:
    """``refine_mask``'s result: the mask, the most swaps a row took, and the layer's output error
    on the calibration inputs (summed over its rows) with wanda's mask and with this one."""

    mask: torch.Tensor
    steps: int
    error_before: float
    error_after: float


@torch.no_grad()
def refine_mask(
    weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, pattern: tuple[int, int] | None = None, steps: int = REFINE_STEPS
) -> Refined:
    """``keep`` improved by swaps: in each row, restore one pruned weight and prune one kept one
    (within the same group of M for N:M) while that lowers the row's output error on the
    calibration inputs, e(p) = (w ⊙ p)ᵀ G (w ⊙ p) with p the pruned positions and G = E[x xᵀ]
    (``gram``; for a Linear, the centred covariance when a bias correction takes the mean error away). Wanda's
    score is this error's diagonal; the swaps account for how inputs move together. The weights
    are not changed, only which are kept, and every row keeps its count (its N per group).
    Each step takes, per row, the restore and the prune that lower the error most, each alone, and
    applies the pair only if the pair's exact change (their interaction included) is negative: the
    error never rises. Rows are independent, so a row whose pair does not help is done (another
    pair might still have helped: a local search, not an exhaustive one). At most ``steps``
    swaps per row. ``weight``: (out, in, ...) with the columns of ``hessian.columns``; ``gram``:
    (in·..., in·...)."""
    w_all = weight.detach().reshape(weight.shape[0], -1).float()
    g = gram.float()
    out = keep.reshape(w_all.shape).clone()
    taken, before, after = 0, 0.0, 0.0
    chunk = max(1, REFINE_VALUES // max(w_all.shape[1], 1))
    for start in range(0, w_all.shape[0], chunk):
        pruned = (~out[start : start + chunk]).float()  # 1: pruned
        s, b, a = _refine_rows(w_all[start : start + chunk], pruned, g, pattern, steps)
        out[start : start + chunk] = pruned == 0
        taken, before, after = max(taken, s), before + b, after + a
    return Refined(out.view_as(keep), taken, before, after)


def _refine_rows(
    w: torch.Tensor, pruned: torch.Tensor, g: torch.Tensor, pattern: tuple[int, int] | None, steps: int
) -> tuple[int, float, float]:
    """``refine_mask`` on a few rows: ``pruned`` (1 = pruned, float) is updated in place. Returns
    (steps taken, error before, error after)."""
    big = torch.finfo(torch.float32).max / 8  # added to the entries a side may not pick
    diag = g.diagonal()
    own = w * w * diag  # a weight's own term of the error
    d = (w * pruned) @ g  # G (w ⊙ p) per row: the error's gradient along each input
    before = float((w * pruned * d).sum())
    # Error change of restoring a weight: own - 2 w d; of cutting one: own + 2 w d. The "own" part
    # and the penalty that bars the other side are kept in one tensor each, updated where a swap is.
    back = own + big * (1 - pruned)
    away = own + big * pruned
    # Below float32's rounding of the row's error, a "gain" is noise: the row stops there.
    floor = 1e-6 * (pruned * own).sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    rows = torch.arange(w.shape[0])  # the rows still gaining, as indices into w
    cw, cd, cb, ca, cf = w, d, back, away, floor  # their working copies (compacted as rows finish)
    # The step's large temporaries live in buffers made once: a process that returns freed memory
    # at once (allocator.for_streaming, as a streamed run does) would otherwise map and
    # fault in fresh pages for each, which made the swaps 1.75x slower there.
    buf_t, buf_r, buf_k, buf_j = (torch.empty_like(w) for _ in range(4))
    taken = 0
    for step in range(steps):
        n = len(rows)
        t = torch.mul(cw, cd, out=buf_t[:n])
        restore = torch.add(cb, t, alpha=-2, out=buf_r[:n])  # error change if this pruned weight came back
        cut = t.mul_(2).add_(ca)  # error change if this kept weight went
        at = torch.arange(n)
        if pattern is None:  # (min's values and indices: faster than argmin on CPU)
            (best_r, j), (best_c, k) = restore.min(1), cut.min(1)
        else:
            m = pattern[1]
            group_r, j_in = restore.view(n, -1, m).min(2)
            group_c, k_in = cut.view(n, -1, m).min(2)
            group = (group_r + group_c).min(1).indices
            best_r, best_c = group_r[at, group], group_c[at, group]
            j, k = group * m + j_in[at, group], group * m + k_in[at, group]
        change = best_r + best_c - 2 * cw[at, j] * cw[at, k] * g[j, k]
        gains = (change < -cf).nonzero().squeeze(1)
        if len(gains) == 0:
            break
        taken = step + 1
        j, k = j[gains], k[gains]
        if len(gains) < 0.75 * n:  # compact: the finished rows never change again
            _write_back((back, d), rows, (cb, cd))
            rows = rows[gains]
            cw, cd, cb, ca, cf = w[rows], cd[gains], cb[gains], ca[gains], cf[gains]
            gains = torch.arange(len(rows))
        wj, wk = cw[gains, j], cw[gains, k]
        own_j, own_k = wj * wj * diag[j], wk * wk * diag[k]
        cb[gains, j], ca[gains, j] = own_j + big, own_j  # j kept now
        cb[gains, k], ca[gains, k] = own_k, own_k + big  # k pruned now
        moved = torch.index_select(g, 0, k, out=buf_k[: len(k)]).mul_(wk[:, None])
        moved.sub_(torch.index_select(g, 0, j, out=buf_j[: len(j)]).mul_(wj[:, None]))
        cd.index_add_(0, gains, moved)
    _write_back((back, d), rows, (cb, cd))
    pruned.copy_(back < big / 2)
    return taken, before, float((w * pruned * d).sum())


def _write_back(full: tuple[torch.Tensor, ...], rows: torch.Tensor, working: tuple[torch.Tensor, ...]) -> None:
    """Compacted working copies' rows go back in place (not needed before the first compaction)."""
    for f, c in zip(full, working):
        if c is not f:
            f[rows] = c
