"""Wanda importance (Sun et al., 2023): score(w_ij) = |w_ij| · ||x_j||_2, where x_j is input
feature j of the layer over the calibration data (all samples and positions); and the bias
correction ``--bias-correction`` adds after it (``bias_shift``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from infercomp.errors import ModelError


def input_norms(
    model: nn.Module,
    names: Iterable[str],
    inputs: torch.Tensor,
    *,
    batch_size: int = 128,
    attention_mask: torch.Tensor | None = None,
    means: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """||x_j||_2 of every input feature of the named Linear / Conv modules, from forward hooks
    while ``inputs`` run through ``model``. Linear: (in_features,); Conv: (in_channels,).
    ``means``: filled with each feature's mean too (over the real tokens where ``attention_mask``
    marks them)."""
    run, positions = batch_runner(
        lambda i: model(inputs[i * batch_size : (i + 1) * batch_size]), range(-(-len(inputs) // batch_size)), batch_size, attention_mask
    )
    return norms_of({n: model.get_submodule(n) for n in names}, run, means=means, positions=positions)


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
    positions: Callable[[], torch.Tensor | None] = lambda: None,
) -> dict[str, torch.Tensor]:
    """``input_norms`` of ``modules`` (name -> Linear / Conv) over whatever ``run()`` runs through
    them (the whole model, or one block at a time: ``infercomp.blocks``). ``means``: filled with
    each input feature's mean, over the positions ``positions()`` marks in the batch running
    (a (batch, tokens) bool mask of the real tokens; None: all of them)."""
    sums: dict[str, torch.Tensor] = {}
    firsts: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str, conv: bool):
        def fn(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            # Conv (N, C, ...): sum over all but C; Linear (..., in): sum over all but the last dim.
            sq = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1) if conv else x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
            if means is not None:
                if conv:
                    total, n = x.transpose(0, 1).reshape(x.shape[1], -1).sum(1), x.numel() // x.shape[1]
                else:
                    real = positions()
                    flat = x.reshape(-1, x.shape[-1])
                    if real is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(real.shape):
                        flat = x[real]  # padding's activations are not the layer's usual input
                    total, n = flat.sum(0), flat.shape[0]
                firsts[name] = firsts[name] + total if name in firsts else total
                counts[name] = counts.get(name, 0) + n

        return fn

    for name, module in modules.items():
        hooks.append(module.register_forward_pre_hook(hook(name, isinstance(module, nn.modules.conv._ConvNd))))
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
