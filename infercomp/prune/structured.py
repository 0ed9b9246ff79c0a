"""Structured (channel) pruning on Torch-Pruning's dependency graph.

Removing output channel c of a layer also removes everything coupled to it: the next layers'
input channels, BatchNorm / LayerNorm entries, residual-coupled layers and parameters, flattened
features. ``torch_pruning.DependencyGraph`` finds those groups by tracing one forward pass; this
module ranks each group's channels, keeps the best ``1 - sparsity`` of them, prunes the module in
place, and returns a *plan* (root layer, dim, kept indices) that the output checkpoint records, so
it says which channels of the input survived. (Loading needs no replay: the loader adapts standard
layers to the stored shapes.)

Importance of channel c of a group (``--importance``):
- ``l1`` (default): R_c = Σ_j |w_cj| over the output rows of the group's Conv/Linear layers;
- ``l2``: the same with the L2 norm;
- ``activation`` (needs ``--data``): Σ over the layers that consume channel c of ||x_c||_2 ·
  ||W[:, c]||_2, the size of the channel's contribution to the next layer on real inputs.
Attention projections (q/k/v of a module with a ``head_dim``, ``attention_head_size`` or
``num_heads`` attribute) are pruned by whole heads, scored by the sum over the head's channels.

Transformers keep their hidden size: the group of the residual stream (embeddings, every block's
LayerNorm / RMSNorm, the output of each attention and FFN block) is never pruned, nor a group whose
channels no later layer consumes (a pooler). What is left is ``--scope``: ``ffn`` (the FFN
intermediate channels), ``heads`` (whole attention heads) or ``all`` (both; for models without
attention, every prunable group), as Torch-Pruning's LLM examples do.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from infercomp.errors import ModelError
from infercomp.models import first_output
from infercomp.patterns import selected
from infercomp.progress import NULL, Progress
from infercomp.prune.magnitude import keep_largest
from infercomp.prune.wanda import input_norms

IMPORTANCES = ("l1", "l2", "activation")
CHANNEL_SCOPES = ("all", "ffn", "heads")
# Modules that carry the residual stream of a transformer: a group touching one is its hidden size.
_RESIDUAL = (nn.LayerNorm, nn.Embedding)
_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass
class _Group:
    root: nn.Module
    name: str
    size: int
    unit: int  # channels removed together: 1, or head_dim for attention projections
    scores: torch.Tensor  # (size,)
    layers: list[str]


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose output size must not change: the last Conv/Linear to run, and any whose
    output is the model's output."""
    called: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _a, out: called.append((mod, out))) for m in model.modules() if isinstance(m, _PRUNABLE)]
    try:
        with torch.no_grad():
            y = model(example)
    finally:
        for h in hooks:
            h.remove()
    y = first_output(y)  # tuple / dict / ModelOutput: the tensor that carries the outputs
    found = [m for m, out in called if out is y]
    if called and called[-1][0] not in found:
        found.append(called[-1][0])
    return found


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` once. Unwrapped parameters (position embeddings) are pruned along their last
    dimension, which is Torch-Pruning's default; its warning about it is not for our users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=first_output, verbose=False)
        except Exception as e:  # tracing runs arbitrary model code
            raise ModelError(f"channel pruning could not trace the model ({type(e).__name__}: {e}); try --method magnitude") from e


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    *,
    sparsity: float,
    importance: str = "l1",
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    calibration: torch.Tensor | None = None,
    scope: str = "all",
    progress: Progress = NULL,
) -> dict[str, Any]:
    """Remove ``sparsity`` of the channels of every prunable group of ``model`` (in place).

    Args:
        model: module in eval mode, on CPU.
        example: one input batch, for tracing.
        sparsity: fraction of each group's channels (or heads) to remove.
        importance: ``l1``, ``l2`` or ``activation``.
        include / exclude: globs on module names; a group is pruned when its root layer is selected
            and none of the layers whose outputs it shrinks is excluded.
        calibration: inputs for ``activation`` importance.
        scope: ``all``, ``ffn`` (channels of groups that are not attention heads) or ``heads``.
        progress: for warnings.

    Returns:
        The plan: ``{"method": "channel", "groups": [{"root", "dim", "size", "unit", "kept", "layers"}]}``.
    """
    names = {m: n for n, m in model.named_modules()}
    frozen = set(output_layers(model, example))
    graph = build_graph(model, example)
    grouped = _grouped_query_projections(model)
    if grouped and scope != "ffn":
        progress.log("attention heads of grouped-query attention are kept whole (only their FFN channels are pruned)")
    groups = _groups(model, graph, names, frozen | grouped, include, exclude, l2=importance == "l2")
    if scope == "ffn" and groups and not any(g.unit > 1 for g in groups):
        progress.log("--scope ffn: this model has no attention heads, so it prunes every channel group (as --scope all does)")
    if scope != "all":
        groups = [g for g in groups if (g.unit > 1) == (scope == "heads")]
    if not groups:
        raise ModelError(
            f"channel pruning found no {'' if scope == 'all' else scope + ' '}layer to prune "
            "(output layers and a transformer's hidden size never change; check --scope/--include/--exclude)"
        )
    if importance == "activation":
        if calibration is None:
            raise ModelError("--importance activation needs --data (calibration inputs)")
        _activation_scores(model, graph, groups, names, calibration)
    plan: list[dict[str, Any]] = []
    for g in groups:
        units = g.size // g.unit
        kept_units = max(1, units - round(sparsity * units))
        unit_scores = g.scores.reshape(units, g.unit).sum(1)
        keep = keep_largest(unit_scores, kept_units).nonzero().flatten()
        kept = (keep[:, None] * g.unit + torch.arange(g.unit)).flatten().tolist()
        plan.append({"root": g.name, "dim": "out", "size": g.size, "unit": g.unit, "kept": kept, "layers": g.layers})
    _apply(model, graph, plan)
    skipped = len([m for m in frozen if m in names])
    if skipped:
        progress.log(f"channel pruning kept the output size of {', '.join(sorted(names[m] for m in frozen))}")
    return {"method": "channel", "groups": plan}


def _apply(model: nn.Module, graph: tp.DependencyGraph, plan: Sequence[dict[str, Any]]) -> None:
    for step in plan:
        try:
            root = model.get_submodule(step["root"])
        except AttributeError as e:
            raise ModelError(f"pruning plan names layer {step['root']!r}, which the model does not have") from e
        size = _out_size(root)
        if size != step["size"]:
            raise ModelError(f"pruning plan expects {step['root']!r} to have {step['size']} outputs, the model has {size}")
        removed = sorted(set(range(size)) - set(step["kept"]))
        if removed:
            fn = graph.get_pruner_of_module(root).prune_out_channels
            graph.get_pruning_group(root, fn, removed).prune(record_history=False)


def _out_size(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def out_rows(mod: nn.Module) -> torch.Tensor:
    """The weight of a Linear / conv as one row per output channel, ``(out, fan_in)``. Transposed
    convolutions store ``(in, out / groups, *kernel)``: their output channels are dim 1."""
    w = mod.weight.detach().float()
    if not getattr(mod, "transposed", False):
        return w.reshape(w.shape[0], -1)
    g = mod.groups
    w = w.reshape(g, w.shape[0] // g, w.shape[1], -1)  # (groups, in/g, out/g, k)
    return w.permute(0, 2, 1, 3).reshape(g * w.shape[2], -1)


def _in_column_norms(mod: nn.Module) -> torch.Tensor:
    """||W[:, j]||_2 for each input channel j of a Linear / conv (ungrouped), ``(in,)``."""
    w = mod.weight.detach().float()
    if getattr(mod, "transposed", False):  # (in, out, *kernel)
        return w.reshape(w.shape[0], -1).pow(2).sum(1).sqrt()
    return w.transpose(0, 1).reshape(w.shape[1], -1).pow(2).sum(1).sqrt()


def _grouped_query_projections(model: nn.Module) -> set[nn.Module]:
    """The q/k/v/o projections of grouped-query attention (several query heads share one key /
    value head): Torch-Pruning 1.6 does not finish tracing their coupling, so they are left whole."""
    out: set[nn.Module] = set()
    for m in model.modules():
        if isinstance(getattr(m, "num_key_value_groups", None), int) and m.num_key_value_groups > 1:
            out.update(c for c in m.children() if isinstance(c, nn.Linear))
    return out


def _is_residual(mod: nn.Module) -> bool:
    return isinstance(mod, _RESIDUAL) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm"))


def _groups(model, graph, names, frozen, include, exclude, *, l2: bool) -> list[_Group]:
    out: list[_Group] = []
    transformer = any(_is_residual(m) for m in model.modules())
    for group in graph.get_all_groups(ignored_layers=list(frozen), root_module_types=_PRUNABLE):
        root = group[0].dep.target.module
        name = names.get(root)
        if name is None or not selected(name, include, exclude):
            continue
        size = len(group[0].idxs)
        scores = torch.zeros(size)
        layers, blocked, projections, consumed = [], False, [], False
        for item in group.items:
            dep, idxs = item.dep, item.idxs
            mod = dep.target.module
            is_out = graph.is_out_channel_pruning_fn(dep.handler)
            if transformer and _is_residual(mod):
                blocked = True  # the hidden size: embeddings, norms and every block's output share it
            consumed = consumed or (not is_out and isinstance(mod, _PRUNABLE))
            mname = names.get(mod)
            if mname is None:
                continue  # functional ops (reshape, add) and unwrapped parameters carry no name here
            layers.append(f"{mname}:{'out' if is_out else 'in'}")
            if is_out and (mod in frozen or not selected(mname, (), exclude)):
                blocked = True
            if getattr(mod, "transposed", False) and mod.groups > 1:
                blocked = True  # Torch-Pruning 1.6 slices grouped transposed convs out of range: left whole
            if is_out and isinstance(mod, _PRUNABLE) and mod.weight is not None:
                rows = out_rows(mod)[idxs]  # (len(idxs), fan_in)
                root_idxs = torch.tensor(item.root_idxs)
                scores.index_add_(0, root_idxs, rows.pow(2).sum(1) if l2 else rows.abs().sum(1))
                if isinstance(mod, nn.Linear):
                    projections.append(mod)
        if blocked or (transformer and not consumed):  # a pooler's outputs are the model's
            continue
        unit = _head_dim(model, names, projections, size)
        out.append(_Group(root, name, size, unit, scores.sqrt() if l2 else scores, sorted(set(layers), key=layers.index)))
    return out


def _head_dim(model: nn.Module, names, projections: list[nn.Linear], size: int) -> int:
    """Channels per attention head when the group's out-projections (q, k, v) belong to a module
    that declares ``head_dim`` or ``num_heads``; 1 otherwise."""
    if len(projections) < 2:
        return 1
    parents = {names[p].rpartition(".")[0] for p in projections}
    if len(parents) != 1:
        return 1
    parent = model.get_submodule(parents.pop())
    head_dim = getattr(parent, "head_dim", None) or getattr(parent, "attention_head_size", None)
    heads = getattr(parent, "num_heads", None) or getattr(parent, "heads", None)
    if not isinstance(head_dim, int) and isinstance(heads, int) and heads > 0:
        head_dim = size // heads
    return head_dim if isinstance(head_dim, int) and head_dim > 0 and size % head_dim == 0 else 1


def _activation_scores(model, graph, groups: list[_Group], names, calibration: torch.Tensor) -> None:
    consumers: dict[str, list[tuple[int, nn.Module, list[int], list[int]]]] = {}
    for gi, g in enumerate(groups):
        group = graph.get_pruning_group(g.root, graph.get_pruner_of_module(g.root).prune_out_channels, list(range(g.size)))
        for item in group.items:
            mod = item.dep.target.module
            if isinstance(mod, _PRUNABLE) and not graph.is_out_channel_pruning_fn(item.dep.handler) and mod in names:
                consumers.setdefault(names[mod], []).append((gi, mod, list(item.idxs), list(item.root_idxs)))
    norms = input_norms(model, consumers, calibration)
    fresh = [torch.zeros(g.size) for g in groups]
    for name, entries in consumers.items():
        for gi, mod, idxs, root_idxs in entries:
            cols = _in_column_norms(mod)
            fresh[gi].index_add_(0, torch.tensor(root_idxs), norms[name][idxs] * cols[idxs])
    for g, s in zip(groups, fresh):
        if s.any():
            g.scores = s
