"""Calibrate a Hugging Face decoder one block at a time, as llm-compressor's sequential pipeline
does: GPTQ, wanda and SparseGPT (``quantize.gptq_integers``, ``prune.wanda_masks``,
``prune.sparsegpt_weights``) on a model larger than memory.

The model is built with its *parameters* on the meta device (no memory; buffers stay real, since
some are computed at construction and never stored, e.g. rotary frequencies). The weights before
the repeated blocks (the embeddings) are read; the calibration inputs run up to the blocks, where each block's call is recorded (the first block's hidden states; every
block's masks and position embeddings). Then, block after block:

1. its weights are read from ``tensors`` one by one (a ``checkpoint.LazyTensors`` reads each from
   disk when asked);
2. the family's ``compress(stage)`` runs: hooks on the block's layers see the inputs that reach
   them (``stage.run(i)`` runs calibration batch ``i`` through the block), and it may change the
   weights (GPTQ writes back the dequantized ones, wanda zeroes the pruned ones);
3. the block runs on the now-compressed weights to give the next block's inputs;
4. its weights go back to the meta device.

Layers outside the blocks are stages of their own: ``head`` (before the blocks in module order)
and ``tail`` (after them, e.g. ``lm_head``: fed by replaying the last block's outputs through the
rest of the model). Held at once: one block's weights, one block's inputs for the calibration
set ((N, T, hidden) floats) and what ``compress`` keeps; the weights outside the blocks only
while they are used (the embeddings while the blocks' inputs are recorded; everything outside
the blocks again for the tail).

``skeleton`` decides whether a checkpoint can go this way: a transformers model whose generation
is decoder-only (``models.is_causal_lm``), with a ModuleList of identical blocks, and whose stored
tensors are exactly the model's (else the caller builds the whole model, which gives the usual
errors).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import infercomp.hf as hf
from infercomp.checkpoint import shapes_of
from infercomp.errors import ModelError
from infercomp.models import is_causal_lm
from infercomp.progress import NULL, Progress

# False: GPTQ and wanda build the whole model even where they could go block by block (kept for
# comparison: bench/bench_sequential.py, tests/test_sequential.py).
SEQUENTIAL = True


class _Stop(Exception):
    """Raised where a recorded forward pass has seen all it needs."""


@dataclass
class Stage:
    """One step of the walk, handed to ``compress``.

    Attributes:
        name: the block's module name (``model.layers.3``), or ``head`` / ``tail``.
        layers: the target layers in it, (full module name, module), in the model's order.
        batches: the calibration batch indices ``run`` takes.
        run: runs batch ``i`` through the stage (forward hooks on ``layers`` see their inputs);
            returns None.
    """

    name: str
    layers: list[tuple[str, nn.Module]]
    batches: range
    run: Callable[[int], None]


@dataclass
class Decoder:
    """A model built with its parameters on the meta device, and where its blocks are.

    Attributes:
        model: the module (parameters on ``meta`` until read).
        path: the blocks' ModuleList's name (``model.layers``).
        blocks: that ModuleList.
        reads: names read from the tensors, in order (what the tests check).
    """

    model: nn.Module
    path: str
    blocks: nn.ModuleList
    reads: list[str] = field(default_factory=list)

    def prefix(self, j: int) -> str:
        return f"{self.path}.{j}."


def skeleton(spec: dict[str, Any] | None, tensors: Mapping[str, torch.Tensor]) -> Decoder | None:
    """The ``Decoder`` of a Hugging Face causal LM whose stored ``tensors`` (logical, by name:
    shapes are read, not data) are exactly its own; None where the model must be built whole."""
    if not SEQUENTIAL or spec is None or spec.get("ref") != hf.HF_REF:
        return None
    config = dict(spec.get("config") or {})
    if not isinstance(config.get("num_hidden_layers"), int):
        return None
    with _parameters_on_meta():
        model = hf.build(config)
    if not is_causal_lm(model):
        return None
    found = _find_blocks(model)
    if found is None:
        return None
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    stored = shapes_of(tensors)  # shapes without reading data
    if any(k not in shapes or shapes[k] != tuple(t.shape) for k, t in stored.items()):
        return None  # pruned channels, extra tensors...: the whole-model loader adapts or explains
    params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False) if n in tensors}
    if any(id(p) not in params for _, p in model.named_parameters(remove_duplicate=False)):
        return None  # a parameter the checkpoint lacks (and no tied alias stores it)
    return Decoder(model.float().eval(), *found)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The largest ModuleList whose entries are all of one type (a decoder's layers)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    return best


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (as accelerate's
    ``init_empty_weights``): the model is built without memory, buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def calibrate(
    decoder: Decoder,
    tensors: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: Collection[str],
    compress: Callable[[Stage], None],
    *,
    batch_size: int,
    progress: Progress = NULL,
) -> None:
    """Walk ``decoder`` block by block (see the module's docstring): ``compress(stage)`` for the
    head, each block and the tail, on the calibration token ids ``inputs`` (N, T) in batches of
    ``batch_size`` (as the whole-model path batches them). ``targets``: module names of the layers
    to hand over."""
    model, blocks = decoder.model, decoder.blocks
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    idx = range(len(batches))
    order = [n for n, _ in model.named_modules()]
    first = order.index(f"{decoder.prefix(0)[:-1]}")
    outside = [(n, m) for n, m in model.named_modules() if n in targets and not n.startswith(decoder.path + ".")]
    head = [(n, m) for n, m in outside if order.index(n) < first]
    tail = [(n, m) for n, m in outside if order.index(n) > first]

    def before_blocks(n: str) -> bool:  # a parameter of the modules the blocks' inputs come from
        return not n.startswith(decoder.path + ".") and order.index(n.rpartition(".")[0]) < first

    with torch.no_grad():
        # Only what makes the blocks' inputs is read now (the embeddings), and freed once those
        # are recorded; what comes after the blocks (final norm, lm_head) is read for the tail.
        _read(decoder, tensors, before_blocks)
        if head:
            with _blocks_replaced(blocks, lambda j, args, kwargs: _raise()):
                compress(Stage("head", head, idx, lambda i: _stopped(model, batches[i])))
        calls = _record(model, blocks, batches)  # calls[i][j] = (args, kwargs) of block j on batch i
        _free_where(decoder, lambda n: not n.startswith(decoder.path + "."))  # tied to lm_head too: read again for the tail
        hidden = [_hidden(calls[i][0]) for i in idx]
        last: list[Any] = []
        with progress.task(f"calibrating {len(blocks)} blocks one at a time", total=len(blocks)) as task:
            for j, block in enumerate(blocks):
                prefix = decoder.prefix(j)
                _read(decoder, tensors, lambda n, p=prefix: n.startswith(p))
                layers = [(prefix + n, m) for n, m in block.named_modules() if n and prefix + n in targets]

                def run(i: int, block: nn.Module = block, j: int = j, xs: list[torch.Tensor] = hidden) -> None:
                    _call(block, calls[i][j], xs[i])

                if layers:
                    compress(Stage(prefix[:-1], layers, idx, run))
                outs = [_call(block, calls[i][j], hidden[i]) for i in idx]  # on the compressed weights
                hidden = [o[0] if isinstance(o, tuple) else o for o in outs]
                last = outs
                _free(block)
                task.advance()
        if tail:  # replayed through the whole model, the blocks stubbed: the embeddings are read again
            _read(decoder, tensors, lambda n: not n.startswith(decoder.path + "."))
            with _blocks_replaced(blocks, lambda j, args, kwargs: last[kwargs.pop("_batch")]):
                compress(Stage("tail", tail, idx, lambda i: _stopped(model, batches[i], _batch=i)))
        _free_where(decoder, lambda n: not n.startswith(decoder.path + "."))


def _raise() -> Any:
    raise _Stop


def _stopped(model: nn.Module, x: torch.Tensor, **marks: Any) -> None:
    """``model(x)``, until a replaced block stops it."""
    _Marks.current = marks
    try:
        model(x)
    except _Stop:
        pass
    finally:
        _Marks.current = {}


class _Marks:
    """What the stub blocks of the current forward pass need to know (the batch being replayed)."""

    current: dict[str, Any] = {}


@contextmanager
def _blocks_replaced(blocks: nn.ModuleList, stub: Callable[[int, tuple[Any, ...], dict[str, Any]], Any]) -> Iterator[None]:
    """Each block's ``forward`` replaced by ``stub(j, args, kwargs)`` (the module stays, so the
    model's loop still reads its attributes, e.g. an attention type)."""

    def make(j: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return stub(j, args, {**kwargs, **_Marks.current})

        return forward

    for j, block in enumerate(blocks):
        block.forward = make(j)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _record(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]) -> list[list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Each block's call (args, kwargs) on each batch, without running any block: the model runs
    up to the blocks, and stand-ins pass the hidden states through (masks and position embeddings
    are made before the loop over the blocks, so they are what the real run passes)."""
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []

    def stub(j: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        calls[-1].append((args, kwargs))
        if j == len(blocks) - 1:
            raise _Stop
        return _hidden((args, kwargs))

    with _blocks_replaced(blocks, stub):
        for x in batches:
            calls.append([])
            _stopped(model, x)
            if len(calls[-1]) != len(blocks):
                raise ModelError(f"the model called {len(calls[-1])} of its {len(blocks)} blocks; cannot calibrate it block by block")
    return calls


def _hidden(call: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _call(block: nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]], hidden: torch.Tensor) -> Any:
    """``block`` as the model calls it, on ``hidden``."""
    args, kwargs = call
    if args:
        return block(hidden, *args[1:], **kwargs)
    return block(*args, **{**kwargs, "hidden_states": hidden})


def _read(decoder: Decoder, tensors: Mapping[str, torch.Tensor], wanted: Callable[[str], bool]) -> None:
    """Give the parameters named ``wanted`` their stored values (float32, as the whole-model path
    runs them), tensor by tensor; tied parameters are read once, under the name stored."""
    seen: set[int] = set()
    named = list(decoder.model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for n, p in named:
        aliases.setdefault(id(p), []).append(n)
    for n, p in named:
        if id(p) in seen or not wanted(n):
            continue
        seen.add(id(p))
        stored = next(a for a in aliases[id(p)] if a in tensors)
        t = tensors[stored]
        decoder.reads.append(stored)
        # A copy: the callbacks change weights in place, and ``tensors`` may be the caller's.
        value = nn.Parameter(t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone(), requires_grad=False)
        for a in aliases[id(p)]:
            owner, _, attr = a.rpartition(".")
            decoder.model.get_submodule(owner)._parameters[attr] = value
    for n, b in decoder.model.named_buffers():
        if wanted(n) and n in tensors:
            b.copy_(tensors[n])
            decoder.reads.append(n)


def _free(block: nn.Module) -> None:
    """The block's parameters back to the meta device."""
    for m in block.modules():
        for attr, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _free_where(decoder: Decoder, wanted: Callable[[str], bool]) -> None:
    """The parameters named ``wanted`` back to the meta device, under every name they have (a tied
    weight is freed only where all its names are wanted)."""
    named = list(decoder.model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for n, p in named:
        aliases.setdefault(id(p), []).append(n)
    for _, p in named:
        names = aliases.get(id(p))
        if not names or p.device.type == "meta" or not all(wanted(a) for a in names):
            continue
        value = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for a in names:
            owner, _, attr = a.rpartition(".")
            decoder.model.get_submodule(owner)._parameters[attr] = value
        aliases.pop(id(p))


def materialised(decoder: Decoder) -> list[int]:
    """Indices of the blocks that hold any real (non-meta) parameter now."""
    return [j for j, b in enumerate(decoder.blocks) if any(p.device.type != "meta" for p in b.parameters())]
