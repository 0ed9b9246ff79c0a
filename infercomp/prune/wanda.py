"""Wanda importance (Sun et al., 2023): score(w_ij) = |w_ij| · ||x_j||_2, where x_j is input
feature j of the layer over the calibration data (all samples and positions)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from infercomp.errors import ModelError


def input_norms(model: nn.Module, names: Iterable[str], inputs: torch.Tensor, *, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """||x_j||_2 of every input feature of the named Linear / Conv modules, from forward hooks
    while ``inputs`` run through ``model``. Linear: (in_features,); Conv: (in_channels,)."""

    def run() -> None:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i : i + batch_size])

    return norms_of({n: model.get_submodule(n) for n in names}, run)


def norms_of(modules: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``input_norms`` of ``modules`` (name -> Linear / Conv) over whatever ``run()`` runs through
    them (the whole model, or one block at a time: ``infercomp.blocks``)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str, conv: bool):
        def fn(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            # Conv (N, C, ...): sum over all but C; Linear (..., in): sum over all but the last dim.
            sq = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1) if conv else x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq

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
    return {n: s.sqrt() for n, s in sums.items()}


def wanda_scores(weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|W| · ||x|| broadcast along the input dimension (a conv's channel norm covers its kh·kw taps)."""
    out = {}
    for name, w in weights.items():
        x = norms[name.rpartition(".")[0]]
        shape = [1, -1] + [1] * (w.dim() - 2)  # (1, in, 1, 1) for conv, (1, in) for linear
        out[name] = w.abs().float() * x.reshape(shape)
    return out
