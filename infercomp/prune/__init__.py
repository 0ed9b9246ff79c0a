"""Pruning: remove weights. ``prune(ckpt, PruneConfig(...), ctx) -> Checkpoint``.

Methods (``METHODS``):
- ``magnitude``: unstructured, the smallest |w| are zeroed (per tensor or one global threshold);
- ``channel``: structured, whole output channels / filters / attention heads / FFN channels are
  removed with everything that depends on them, so the tensors really shrink (``structured``);
- ``2:4``: N:M semi-structured (``--n 2 --m 4``), the smallest |w| of every M consecutive inputs;
- ``wanda``: |w| · ||x|| from calibration activations (``--data``), per output row or N:M, the
  masks then refined by swaps that lower each layer's output error (``wanda.refine_mask``);
- ``sparsegpt``: the same shapes of mask, chosen and compensated with the inverse Hessian of each
  layer's output error (``--data``): the weights kept are updated (``sparsegpt``).
Zeroed weights are stored as a bitmask plus the non-zero values where that is smaller
(``infercomp.formats.sparse``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

import infercomp.blocks as blocks
import infercomp.formats as formats
import infercomp.hessian as hessian
import infercomp.hf as hf
from infercomp.checkpoint import Checkpoint, shapes_of
from infercomp.errors import DataError, UsageError
from infercomp.formats.sparse import BITMASK, BITMASK_24
from infercomp.models import example_batch, first_output
from infercomp.patterns import selected_weight
from infercomp.prune.magnitude import magnitude_masks, score_masks
from infercomp.prune.nm import is_nm, nm_fits, nm_mask
from infercomp.prune.sparsegpt import sparsegpt
from infercomp.prune.structured import CHANNEL_SCOPES, IMPORTANCES, prune_channels
from infercomp.prune.wanda import batch_runner, bias_shift, input_norms, norms_of, refine_mask, wanda_scores
from infercomp.transform import Context, Transform, TransformConfig, choice

SCOPES = ("layer", "global", *CHANNEL_SCOPES)


@dataclass(frozen=True)
class PruneConfig(TransformConfig):
    """How to prune.

    Attributes:
        method: see ``METHODS``.
        sparsity: fraction to remove, 0 <= s < 1: of the weights (``magnitude``, ``wanda``) or of
            each layer's channels / heads (``channel``). N:M methods take their sparsity from N/M.
        scope: ``layer`` (each tensor reaches ``sparsity``) or ``global`` (one threshold for all;
            ``magnitude`` only). None picks ``global`` for magnitude (small first layers stay whole:
            on the digits CNN at 50 % it loses 0.0 points where ``layer`` loses 10.8), ``all`` for
            channel and ``layer`` for the other methods. ``channel`` takes ``all``, ``ffn`` (FFN
            intermediate channels) or ``heads`` (whole attention heads); a transformer's hidden
            size is never pruned (``structured``).
        include / exclude: glob patterns on module names (``fc*``, ``layers.*.q``).
        n / m: keep N of every M consecutive inputs (``2:4`` defaults to 2 and 4; ``wanda`` and
            ``sparsegpt`` with them are N:M instead of unstructured).
        importance: channel score: ``l1`` (default), ``l2`` or ``activation`` (needs ``--data``).
        bias_correction: ``wanda`` only: add to each pruned layer's bias what its removed weights
            contributed on average over the calibration data (``wanda.bias_shift``); layers
            without a bias are left as they are.
        refine: ``wanda`` only: after wanda's masks, swap pruned and kept weights of a row while
            that lowers the layer's output error on the calibration data (``wanda.refine_mask``;
            the weights are not changed). None: on for wanda; False gives the paper's masks.
    """

    transform: ClassVar[str] = "prune"
    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    n: int | None = None
    m: int | None = None
    importance: str = "l1"
    bias_correction: bool = False
    refine: bool | None = None

    def __post_init__(self) -> None:
        choice(self.method, tuple(METHODS), "--method")
        if self.refine is None:  # resolved once, so it is recorded
            object.__setattr__(self, "refine", self.method == "wanda")
        if self.scope is None:  # frozen dataclass: resolve the default once, so it is recorded
            default = {"magnitude": "global", "channel": "all"}.get(self.method, "layer")
            object.__setattr__(self, "scope", default)
        choice(self.scope, SCOPES, "--scope")
        choice(self.importance, IMPORTANCES, "--importance")
        if not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool):
            raise UsageError(f"sparsity must be a number (a fraction: 0.5 removes half), got {self.sparsity!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"--sparsity must be in [0, 1) (a fraction: 0.5 removes half), got {self.sparsity}")
        if self.scope == "global" and self.method != "magnitude":
            raise UsageError(f"--scope global works with --method magnitude only, not {self.method}")
        if (self.scope in CHANNEL_SCOPES) != (self.method == "channel"):
            allowed = "all, ffn or heads" if self.method == "channel" else "layer or global"
            raise UsageError(f"--scope {self.scope} does not apply to --method {self.method}; it takes {allowed}")
        if self.importance != "l1" and self.method != "channel":
            raise UsageError(f"--importance applies to --method channel, not {self.method}")
        if self.bias_correction and self.method != "wanda":
            raise UsageError(f"--bias-correction applies to --method wanda, not {self.method}")
        if self.refine and self.method != "wanda":
            raise UsageError(f"--refine applies to --method wanda, not {self.method}")
        if (self.n is None) != (self.m is None):
            raise UsageError("--n and --m go together (e.g. --n 2 --m 4)")
        if self.n is not None:
            if self.method not in ("2:4", "wanda", "sparsegpt"):
                raise UsageError(f"--n/--m apply to --method 2:4, wanda and sparsegpt, not {self.method}")
            if not 0 < self.n < self.m:
                raise UsageError(f"--n {self.n} --m {self.m}: need 0 < N < M (2:4 keeps 2 of every 4)")
        nm = self.pattern()
        if nm is not None:  # N:M fixes the sparsity at 1 - N/M: record what is really removed
            object.__setattr__(self, "sparsity", 1 - nm[0] / nm[1])

    def pattern(self) -> tuple[int, int] | None:
        """(N, M) for semi-structured pruning, None for unstructured / channel."""
        if self.n is not None and self.m is not None:
            return self.n, self.m
        return (2, 4) if self.method == "2:4" else None


def prune(ckpt: Checkpoint, config: PruneConfig, ctx: Context) -> Checkpoint:
    """Apply ``config`` to ``ckpt`` and return the pruned checkpoint, zeros stored as bitmasks
    where that is smaller."""
    return METHODS[config.method](ckpt, config, ctx)


# ------------------------------------------------------------------------------- unstructured / N:M


def _targets(ckpt: Checkpoint, dense: dict[str, torch.Tensor], config: PruneConfig) -> dict[str, torch.Tensor]:
    targets = {n: t for n, t in dense.items() if selected_weight(n, t, config.include, config.exclude)}
    if not targets:
        raise UsageError(f"{ckpt.name}: no weight matches --include/--exclude; nothing to prune")
    return targets


def _nm_targets(ckpt: Checkpoint, targets: dict[str, torch.Tensor], m: int, ctx: Context) -> dict[str, torch.Tensor]:
    """The targets whose input size divides by M; the others are skipped with a warning."""
    fits = {n: t for n, t in targets.items() if nm_fits(t, m)}
    skipped = sorted(set(targets) - set(fits))
    if not fits:
        n0 = skipped[0]
        raise UsageError(
            f"{ckpt.name}: N:M pruning groups every {m} inputs, but {n0!r} has input size "
            f"{targets[n0].numel() // targets[n0].shape[0]}, not divisible by {m} (nor is any other selected weight); "
            "choose other layers with --include/--exclude or another --m"
        )
    for n in skipped:
        t = targets[n]
        ctx.progress.log(f"skipped {n}: input size {t.numel() // t.shape[0]} is not divisible by {m}, so it stays dense")
    return fits


def magnitude_targets(ckpt: Checkpoint, dense: dict[str, torch.Tensor], config: PruneConfig, ctx: Context) -> dict[str, torch.Tensor]:
    """The weights magnitude / N:M pruning cuts: selected by --include/--exclude, and for N:M with
    inputs in groups of M. Reads names and shapes only (``dense`` may hold meta tensors)."""
    targets = _targets(ckpt, dense, config)
    pattern = config.pattern()
    return targets if pattern is None else _nm_targets(ckpt, targets, pattern[1], ctx)


def tensor_mask(weight: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """Keep-mask of one weight on its own: N:M, or ``layer`` scope (``global`` needs them all:
    ``magnitude_masks``, or ``magnitude.Selection`` over a stream)."""
    pattern = config.pattern()
    if pattern is not None:
        return nm_mask(weight.abs(), *pattern)
    return magnitude_masks({"w": weight}, config.sparsity, "layer")["w"]


def _magnitude(ckpt: Checkpoint, config: PruneConfig, ctx: Context) -> Checkpoint:
    dense = formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    targets = magnitude_targets(ckpt, dense, config, ctx)
    pattern = config.pattern()
    if pattern is not None or config.scope == "layer":
        masks = {n: tensor_mask(t, config) for n, t in targets.items()}
    else:
        masks = magnitude_masks(targets, config.sparsity, config.scope)
    return _masked(ckpt, dense, masks, pattern, ctx)


def _wanda(ckpt: Checkpoint, config: PruneConfig, ctx: Context) -> Checkpoint:
    """Wanda: |w| · ||x|| per output row (or N:M). A Hugging Face causal LM goes one block at a
    time (``infercomp.blocks``), each block's layers scored on the inputs that passed the blocks
    before it pruned, as the Wanda authors' code does; other models run whole, every layer scored
    on the original model's inputs."""
    dense = formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    biases: dict[str, torch.Tensor] = {}
    masks = wanda_masks(ckpt, dense, config, ctx, biases=biases)
    return _masked(ckpt, dense, masks, config.pattern(), ctx, replaced=biases)


def wanda_masks(
    ckpt: Checkpoint,
    dense: Mapping[str, torch.Tensor],
    config: PruneConfig,
    ctx: Context,
    *,
    on_done: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
    biases: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks of the weights wanda prunes (``ctx.data`` calibrates). ``dense``: the logical
    tensors, or a ``checkpoint.LazyTensors`` of them: a causal LM then reads one block at a time.
    ``on_done(name, pruned weight, mask)``, for a causal LM: each block's weights handed over as
    soon as they are pruned, instead of their masks returned (a streamed run stores them at once).
    ``biases``: with ``config.bias_correction``, filled with the corrected biases (name -> tensor
    in its stored dtype) to store in place of the input's."""
    if ctx.data is None:
        raise DataError("--method wanda needs --data: calibration inputs whose activations weight |w| (a few hundred samples)")
    # |w| * ||x|| needs the layer's input features along the weight's columns: plain Linear and
    # ungrouped, non-transposed convolutions. Embeddings (token ids in), depthwise and transposed
    # convs are left alone, with a note.
    targets, decoder, model = _calibrated_layers(
        ckpt, dense, config, ctx, fits=_wanda_fits, kinds="Linear / ungrouped Conv", build=lambda: ctx.loader.build(ckpt, runtime=False)
    )
    pattern = config.pattern()
    grams: dict[str, torch.Tensor] | None = {} if config.refine else None
    refined: list[tuple[float, float, int]] = []  # per layer: error with wanda's mask, with the refined one, swaps

    def masks_of(
        weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], done: Callable[[], None] = lambda: None
    ) -> dict[str, torch.Tensor]:
        """Wanda's masks, refined where ``grams`` has the layer's input moments; ``done()`` after each refined."""
        scores = wanda_scores(weights, norms)
        if pattern is not None:
            found = {n: nm_mask(s, *pattern) for n, s in scores.items()}
        else:
            found = score_masks(scores, config.sparsity, "row")  # Wanda compares weights within an output row
        for n in found if grams is not None else ():
            layer = n.rpartition(".")[0]
            if layer not in grams:
                continue  # a layer hessian.columns cannot see as a matmul keeps wanda's mask (noted below)
            gram = grams[layer]
            if means is not None and f"{layer}.bias" in corrected and weights[n].dim() == 2:
                gram = gram - torch.outer(means[layer], means[layer])  # the bias takes the mean error away (a conv's stays uncentred)
            r = refine_mask(weights[n], found[n], gram, pattern)
            found[n] = r.mask
            refined.append((r.error_before, r.error_after, r.steps))
            done()
        return found

    modules = [n.rpartition(".")[0] for n in targets]
    stored = shapes_of(dense)
    encoded = set(ckpt.encodings)
    # Biases corrected: those of pruned layers, stored plainly (an encoded one is left alone).
    corrected = {f"{n}.bias" for n in modules if f"{n}.bias" in stored and f"{n}.bias" not in encoded} if config.bias_correction else set()
    if config.bias_correction and not corrected:
        ctx.progress.log("--bias-correction: no pruned layer has a bias; nothing to correct")
    means: dict[str, torch.Tensor] | None = {} if corrected else None
    mask_rows = ctx.data.attention_mask

    def correct(layers: dict[str, torch.nn.Module], found: dict[str, torch.Tensor]) -> None:
        """Each pruned layer's bias += what its removed weights added on average (before they go)."""
        assert means is not None
        for n, mask in found.items():
            layer = n.rpartition(".")[0]
            if f"{layer}.bias" in corrected:
                bias = layers[layer].bias
                new = (bias.detach().float() + bias_shift(layers[layer].weight, mask, means[layer])).to(stored[f"{layer}.bias"].dtype)
                with torch.no_grad():
                    bias.copy_(new)  # a causal LM's next blocks calibrate on the corrected block
                if biases is not None:
                    biases[f"{layer}.bias"] = new

    if decoder is not None:
        masks: dict[str, torch.Tensor] = {}

        def compress(stage: blocks.Stage) -> None:
            run, positions = batch_runner(stage.run, stage.batches, WANDA_BATCH, mask_rows)  # blocks.calibrate's batches
            if means is not None:
                means.clear()
            if grams is not None:
                grams.clear()
            norms = norms_of(dict(stage.layers), run, means=means, grams=grams, positions=positions)
            weights = {f"{n}.weight": m.weight for n, m in stage.layers}
            found = masks_of(weights, norms)
            if means is not None:
                correct(dict(stage.layers), found)
            for n, mask in found.items():
                weights[n].mul_(mask)  # the next blocks calibrate on the pruned block
                if on_done is not None:
                    on_done(n, weights[n].detach(), mask)
            if on_done is None:
                masks.update(found)

        blocks.calibrate(decoder, dense, ctx.data.inputs, set(modules), compress, batch_size=WANDA_BATCH, progress=ctx.progress)
    else:
        with ctx.progress.task(f"wanda: calibrating on {len(ctx.data)} samples", total=None):
            norms = input_norms(model, modules, ctx.data.inputs, batch_size=WANDA_BATCH, attention_mask=mask_rows, means=means, grams=grams)
        if grams is None:
            masks = masks_of({n: dense[n] for n in targets}, norms)
        else:
            with ctx.progress.task("wanda: refining the masks", total=len(grams)) as task:
                masks = masks_of({n: dense[n] for n in targets}, norms, task.advance)
        if means is not None:
            correct({n: model.get_submodule(n) for n in modules}, masks)
    _note_refined(refined, len(targets), ctx)
    return masks


def _note_refined(refined: list[tuple[float, float, int]], layers: int, ctx: Context) -> None:
    """One line: how much the swaps lowered the layers' output error (median ratio over layers)."""
    if not refined:
        return
    ratios = sorted(after / before for before, after, _ in refined if before > 0)
    median = f"; median output error {ratios[len(ratios) // 2]:.2f}x wanda's on the calibration data" if ratios else ""
    left = (
        f" ({layers - len(refined)} other(s) keep wanda's masks: not a plain Linear or zero-padded Conv2d)" if layers > len(refined) else ""
    )
    ctx.progress.log(
        f"wanda: refined the masks of {len(refined)} layer(s) by swaps, up to {max(s for *_, s in refined)} per row{left}{median}"
    )


WANDA_BATCH = 128


def _calibrated_layers(
    ckpt: Checkpoint,
    dense: Mapping[str, torch.Tensor],
    config: PruneConfig,
    ctx: Context,
    *,
    fits: Callable[[torch.nn.Module], bool],
    kinds: str,
    build: Callable[[], torch.nn.Module],
) -> tuple[dict[str, torch.Tensor], blocks.Decoder | None, torch.nn.Module]:
    """(the weights a calibrated method prunes, the causal LM's skeleton or None, the model whose
    layers it calibrates): selected by --include/--exclude, in groups of M for N:M, in layers
    ``fits`` accepts (the others skipped with a note). ``build`` makes the whole model when the
    checkpoint is no causal LM that goes block by block; nothing is read before that."""
    targets = _targets(ckpt, shapes_of(dense), config)  # names and shapes: nothing read yet
    pattern = config.pattern()
    if pattern is not None:
        targets = _nm_targets(ckpt, targets, pattern[1], ctx)
    decoder = blocks.skeleton(ctx.loader.spec_for(ckpt), dense)
    model = decoder.model if decoder is not None else build()
    odd = sorted(n for n in targets if not fits(model.get_submodule(n.rpartition(".")[0])))
    if odd:
        ctx.progress.log(f"{config.method}: skipped {len(odd)} weight(s) that are not {kinds}, e.g. {odd[0]!r}")
        targets = {n: t for n, t in targets.items() if n not in odd}
    if not targets:
        raise UsageError(f"{ckpt.name}: --method {config.method} found no {kinds.replace(' / ', ' or ')} weight to prune")
    return targets, decoder, model


def _wanda_fits(module: torch.nn.Module) -> bool:
    if type(module) is torch.nn.Linear:
        return True
    conv = isinstance(module, torch.nn.modules.conv._ConvNd)
    return conv and not module.transposed and module.groups == 1


def _sparsegpt(ckpt: Checkpoint, config: PruneConfig, ctx: Context) -> Checkpoint:
    """SparseGPT: the masks of wanda's shapes (per row or N:M), each layer's kept weights updated
    to make up for the ones removed. Layers go in the model's order, each calibrated on inputs
    that passed the layers before it pruned; a Hugging Face causal LM one block at a time
    (``infercomp.blocks``)."""
    dense = formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    weights, masks = sparsegpt_weights(ckpt, dense, config, ctx)
    return _masked(ckpt, {**dense, **weights}, masks, config.pattern(), ctx)


def sparsegpt_weights(
    ckpt: Checkpoint,
    dense: Mapping[str, torch.Tensor],
    config: PruneConfig,
    ctx: Context,
    *,
    on_done: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(updated weights in their stored dtype, keep-masks) of the Linear / Conv2d weights SparseGPT
    prunes, calibrated on ``ctx.data``. A layer the calibration never reaches is pruned by
    magnitude, with a note. ``dense`` may be a ``checkpoint.LazyTensors``: a causal LM then reads
    one block at a time. ``on_done(name, weight, mask)``: each layer's handed over as soon as it is
    pruned, instead of returned (a streamed run stores them at once)."""
    if ctx.data is None:
        raise DataError(
            "--method sparsegpt needs --data: calibration inputs whose activations make each layer's Hessian (a few hundred samples)"
        )
    stored_dtype = {n: t.dtype for n, t in shapes_of(dense).items()}

    def whole() -> torch.nn.Module:  # dense may be lazy: read only when the whole model is built
        return ctx.loader.build(Checkpoint(tensors=dict(dense), model=ckpt.model, plan=ckpt.plan, path=ckpt.path), runtime=False).float()

    targets, decoder, model = _calibrated_layers(
        ckpt, dense, config, ctx, fits=hessian.supported, kinds="Linear / ungrouped Conv2d", build=whole
    )
    pattern = config.pattern()
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}

    def layer(name: str, m: torch.nn.Module, run: Any, batches: Any) -> None:
        h, rows = hessian.collect(run, m, batches)
        if rows == 0:
            ctx.progress.log(f"sparsegpt: layer {name!r} did not run on the calibration inputs; pruned by magnitude")
            keep = tensor_mask(m.weight.detach(), config)
            w = m.weight.detach().float() * keep
        else:
            w, keep = sparsegpt(m.weight, h, config.sparsity, pattern)
        with torch.no_grad():
            m.weight.copy_(w)  # later layers calibrate on this one pruned
        w = w.to(stored_dtype[f"{name}.weight"])
        if on_done is not None:
            on_done(f"{name}.weight", w, keep)
        else:
            weights[f"{name}.weight"], masks[f"{name}.weight"] = w, keep

    chosen = {n.rpartition(".")[0] for n in targets}
    if decoder is not None:

        def compress(stage: blocks.Stage) -> None:
            for n, m in stage.layers:
                layer(n, m, stage.run, stage.batches)

        blocks.calibrate(decoder, dense, ctx.data.inputs, chosen, compress, batch_size=CALIBRATION_BATCH, progress=ctx.progress)
        return weights, masks
    inputs = ctx.data.inputs
    batches = [inputs[i : i + CALIBRATION_BATCH] for i in range(0, len(inputs), CALIBRATION_BATCH)]
    layers = [(n, m) for n, m in model.named_modules() if n in chosen]
    with ctx.progress.task(f"sparsegpt on {len(inputs)} calibration inputs", total=len(layers)) as task:
        for n, m in layers:
            layer(n, m, model, batches)
            task.advance()
    return weights, masks


CALIBRATION_BATCH = 32


def _masked(
    ckpt: Checkpoint,
    dense: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    pattern: tuple[int, int] | None,
    ctx: Context,
    *,
    replaced: dict[str, torch.Tensor] | None = None,
) -> Checkpoint:
    """Zero the masked weights; store them sparse; store ``replaced`` (plain tensors: corrected
    biases) in place of the input's; keep every other tensor as it was stored."""
    note_pattern(pattern, ctx)
    # Untouched tensors keep their stored form (quantized ones stay quantized).
    tensors, encs = formats.stored_form(ckpt.tensors, ckpt.encodings, masks, ckpt.name)
    tensors.update(replaced or {})
    for name, mask in masks.items():
        stored, spec = encode_pruned(name, dense[name], mask, pattern)
        tensors.update(stored)
        if spec is not None:
            encs[name] = spec
    return Checkpoint(tensors=tensors, model=ckpt.model, encodings=encs, plan=ckpt.plan)


def note_pattern(pattern: tuple[int, int] | None, ctx: Context) -> None:
    if pattern == (2, 4) and ctx.device.type != "cuda":
        ctx.progress.log("2:4 weights run dense on CPU (torch's semi-structured kernels are CUDA-only): expect no speed-up here")


def encode_pruned(
    name: str, weight: torch.Tensor, mask: torch.Tensor, pattern: tuple[int, int] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Stored tensors and spec of ``weight`` with the weights outside ``mask`` zeroed (bitmask form
    where smaller; 2:4 always). The bitmask form is taken from ``weight`` and ``mask`` directly:
    the zeroed tensor is only made when it is stored dense."""
    fmt = BITMASK_24 if pattern == (2, 4) else BITMASK
    extra = None if pattern is None else {"pattern": f"{pattern[0]}:{pattern[1]}"}
    return fmt.encode(name, weight, extra=extra, keep=mask)


# ------------------------------------------------------------------------------------- structured


def _channel(ckpt: Checkpoint, config: PruneConfig, ctx: Context) -> Checkpoint:
    model = ctx.loader.build(ckpt, runtime=False).cpu().eval()
    # Two samples to trace the model with: from --data, else noise of the model's known input shape.
    example = example_batch(ckpt, ctx.loader, model, 2, ctx.data)
    if example is None:
        raise UsageError(f"{ckpt.name}: channel pruning traces the model and needs an example input; pass --data")
    with torch.no_grad():
        before = first_output(model(example))
    calibration = None
    if config.importance == "activation":
        if ctx.data is None:
            raise DataError("--importance activation needs --data: calibration inputs whose activations rank the channels")
        calibration = ctx.data.inputs
    with ctx.progress.task("channel pruning", total=None):
        stage = prune_channels(
            model,
            example,
            sparsity=config.sparsity,
            importance=config.importance,
            include=config.include,
            exclude=config.exclude,
            calibration=calibration,
            scope=config.scope,
            progress=ctx.progress,
        )
    with torch.no_grad():
        after = first_output(model(example))
    if after.shape != before.shape:  # the output layers are frozen, so this is a bug, not a user error
        raise RuntimeError(f"channel pruning changed the output shape {tuple(before.shape)} -> {tuple(after.shape)}")
    dense = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    encs: dict[str, dict[str, Any]] = {}
    for name, t in dense.items():  # weights that still hold zeros (pruned before) stay compressed
        if selected_weight(name, t, (), ()):
            stored, spec = BITMASK.encode(name, t)
            tensors.update(stored)
            if spec is not None:
                encs[name] = spec
        else:
            tensors[name] = t
    stages = list((ckpt.plan or {}).get("prune", []))
    spec = ckpt.model
    if spec is not None and spec.get("ref") == hf.HF_REF and isinstance(spec.get("config"), dict):
        shapes = {k: tuple(t.shape) for k, t in dense.items()}
        spec = {**spec, "config": hf.resized_config(spec["config"], stage, shapes)}  # config.json's intermediate_size, heads
    return Checkpoint(tensors=tensors, model=spec, encodings=encs, plan={**(ckpt.plan or {}), "prune": [*stages, stage]})


METHODS: dict[str, Transform] = {
    "magnitude": _magnitude,
    "channel": _channel,
    "2:4": _magnitude,
    "wanda": _wanda,
    "sparsegpt": _sparsegpt,
}
__all__ = [
    "METHODS",
    "PruneConfig",
    "encode_pruned",
    "is_nm",
    "magnitude_masks",
    "magnitude_targets",
    "nm_mask",
    "note_pattern",
    "prune",
    "prune_channels",
    "sparsegpt_weights",
    "tensor_mask",
    "wanda_masks",
]
