"""``report --sensitivity SPEC``: compress one layer at a time, rank the layers by the damage each
does, and suggest an ``--exclude`` list that keeps the whole model within ``--max-drop``.

SPEC is ``quantize:SCHEME`` (``quantize:int4``, ``quantize:int8``...), ``prune:magnitude:SPARSITY``
or ``prune:channel:SPARSITY``. The damage of a layer is the drop in accuracy on ``--data`` when only
that layer is compressed (with labels), else the drop in top-1 agreement with the uncompressed
model. The suggestion is checked, not guessed: layers are excluded in order of damage until the
*whole* model, compressed except for them, measures within ``max_drop`` on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import infercomp.formats as formats
from infercomp.checkpoint import Checkpoint
from infercomp.data import Dataset
from infercomp.errors import InfercompError, UsageError
from infercomp.metrics import accuracy, fidelity
from infercomp.models import ModelLoader, predict
from infercomp.patterns import selected_weight
from infercomp.progress import NULL, Progress
from infercomp.prune import PruneConfig, prune
from infercomp.quantize import SCHEMES, QuantizeConfig, quantize
from infercomp.transform import Context, TransformConfig

DEFAULT_MAX_DROP = 0.005


@dataclass
class Sensitivity:
    """The result, as the report's JSON ``sensitivity`` object.

    Attributes:
        spec: what was applied, e.g. ``quantize:int4``.
        metric: ``accuracy_drop`` (labels) or ``top1_agreement_drop`` (no labels).
        layers: per module, sorted by ``drop`` (largest first): ``{"name", "drop", "cosine_mean"}``.
        max_drop: the budget for the whole model.
        suggested_exclude: modules to leave uncompressed; ``drop_with_exclude`` what the whole
            model, compressed except for them, measured (fractions).
    """

    spec: str
    metric: str
    max_drop: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    suggested_exclude: list[str] = field(default_factory=list)
    drop_with_exclude: float | None = None
    drop_all: float | None = None


def parse_spec(spec: str) -> TransformConfig:
    """``quantize:int4`` / ``prune:magnitude:0.5`` / ``prune:channel:0.3`` -> a config for all layers."""
    parts = spec.strip().split(":")
    try:
        if parts[0] == "quantize" and len(parts) == 2 and parts[1] in SCHEMES:
            return QuantizeConfig(scheme=parts[1])
        if parts[0] == "prune" and len(parts) == 3 and parts[1] in ("magnitude", "channel"):
            scope = {"scope": "layer"} if parts[1] == "magnitude" else {}
            return PruneConfig(method=parts[1], sparsity=float(parts[2]), **scope)
    except ValueError:
        pass
    raise UsageError(f"--sensitivity {spec!r}: expected quantize:SCHEME ({', '.join(SCHEMES)}), prune:magnitude:S or prune:channel:S")


def _with(config: TransformConfig, **changes: Any) -> TransformConfig:
    values = {k: v for k, v in config.to_dict().items() if k not in ("include", "exclude")}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return type(config)(**{**values, **changes})


def analyse(
    ckpt: Checkpoint,
    spec: str,
    *,
    loader: ModelLoader,
    data: Dataset,
    max_drop: float = DEFAULT_MAX_DROP,
    batch_size: int = 256,
    progress: Progress = NULL,
) -> Sensitivity:
    """Compress each layer of ``ckpt`` alone as ``spec`` says and measure the damage on ``data``."""
    config = parse_spec(spec)
    if not 0 <= max_drop < 1:
        raise UsageError(f"--max-drop must be in [0, 1), got {max_drop}")
    transform = quantize if isinstance(config, QuantizeConfig) else prune
    ctx = Context(loader=loader, data=data, device=torch.device("cpu"))
    cpu = torch.device("cpu")
    reference = predict(loader.build(ckpt), data, batch_size=batch_size, device=cpu)
    labelled = data.labels is not None and accuracy(reference, data.labels) is not None

    def score(c: Checkpoint) -> tuple[float, float]:
        out = predict(loader.build(c), data, batch_size=batch_size, device=cpu)
        fid = fidelity(out, reference)
        if labelled:
            return accuracy(reference, data.labels) - accuracy(out, data.labels), fid["cosine_mean"]
        return 1.0 - fid["top1_agreement"], fid["cosine_mean"]

    dense = formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    modules = [n.removesuffix(".weight") for n, t in dense.items() if selected_weight(n, t, (), ())]
    result = Sensitivity(spec=spec, metric="accuracy_drop" if labelled else "top1_agreement_drop", max_drop=max_drop)
    with progress.task(f"sensitivity {spec}: one layer at a time", total=len(modules)) as task:
        for name in modules:
            try:
                drop, cos = score(transform(ckpt, _with(config, include=(name,)), ctx))
                result.layers.append({"name": name, "drop": drop, "cosine_mean": cos})
            except InfercompError as e:  # a layer this method cannot compress (an output layer for channel pruning)
                result.layers.append({"name": name, "drop": None, "cosine_mean": None, "note": str(e)})
            task.advance()
    result.layers.sort(key=lambda r: -1.0 if r["drop"] is None else r["drop"], reverse=True)
    result.drop_all = score(transform(ckpt, config, ctx))[0]
    _suggest(result, lambda exclude: score(transform(ckpt, _with(config, exclude=tuple(exclude)), ctx))[0])
    return result


def _suggest(result: Sensitivity, measure_with: Any) -> None:
    """Exclude layers in order of damage until the whole model, compressed except for them,
    measures within the budget (each candidate list is measured, so the promise holds on this data)."""
    ranked = [r["name"] for r in result.layers if r["drop"] is not None]
    if result.drop_all is not None and result.drop_all <= result.max_drop:
        result.suggested_exclude, result.drop_with_exclude = [], result.drop_all
        return
    for k in range(1, len(ranked)):
        drop = measure_with(ranked[:k])
        if drop <= result.max_drop:
            result.suggested_exclude, result.drop_with_exclude = ranked[:k], drop
            return
    result.suggested_exclude, result.drop_with_exclude = ranked, None  # nothing compressible fits the budget
