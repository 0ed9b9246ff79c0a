"""Streaming weight-only transforms: checkpoints larger than memory, one tensor at a time.

Magnitude and N:M pruning and round-to-nearest quantization (int8, int8-dynamic, int4, fp8,
fp16, bf16) need no model code: each weight is transformed on its own (global magnitude pruning
needs one threshold, found exactly from histograms first: one pass over the weights, two when a
sampled guess of where it lies was wrong: ``prune.magnitude.Selection``).
``run`` reads the input tensor by tensor (``checkpoint.load(lazy=True)``), calls the same
per-tensor functions as the in-memory transforms (``prune.tensor_mask`` / ``encode_pruned``,
``quantize.quantize_tensor`` / ``cast_tensor``), and appends what they store to a *spool* file
beside the output. A safetensors header must list every tensor's size before the data, and
sparse and quantized sizes depend on the data, so the output is assembled once all is known:
header, then the spooled bytes in name order copied in the kernel (``os.copy_file_range``), into
the usual atomic temp file. A Hugging Face directory output (a directory in, ``-o`` not a
``.safetensors`` file) is made from the spool tensor by tensor (``hf.HFOutput``: compressed-tensors'
layout, the layer types from a build on the meta device) into a second spool, then written as
shards of ``--max-shard-size`` into the usual atomic temp directory. The output is byte for byte
what the in-memory path writes. Peak memory: the largest tensor and its transform's temporaries
(one tensor at a time; only the threshold passes read the next weight ahead on a thread). The
walk counts the non-zeros of what it reads, and of what it stores where that needs no decoding
(pruned and untouched tensors), so the static comparison reads only the rest again.

``--stream`` forces it, ``--no-stream`` forbids it; by default a transform streams when it can and
the input is larger than ``STREAM_ABOVE`` on disk. A streamed output that large is compared by its
static figures only (size, parameters, sparsity, bits per weight), read tensor by tensor too.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import torch

import infercomp.allocator as allocator
import infercomp.blocks as blocks
import infercomp.checkpoint as checkpoint
import infercomp.formats as formats
import infercomp.hf as hf
from infercomp.checkpoint import Checkpoint
from infercomp.data import Dataset, load_data
from infercomp.errors import UsageError
from infercomp.formats.base import Spec, count_nonzero
from infercomp.formats.grid import Quantized
from infercomp.measure import Comparison, MeasureOptions, check_data, compare, is_weight
from infercomp.models import ModelLoader
from infercomp.progress import NULL, Progress
from infercomp.prune import PruneConfig, encode_pruned, magnitude_targets, note_pattern, sparsegpt_weights, tensor_mask, wanda_masks
from infercomp.prune.magnitude import Selection, kept_count, near
from infercomp.quantize import CASTS, QuantizeConfig, cast_tensor, gptq_integers, note_scheme, quantize_tensor, quantized_weights
from infercomp.transform import Context, TransformConfig, pinned_threads
from infercomp.version import __version__

# By default a transform that can stream does so for inputs larger than this on disk (1 GiB):
# smaller ones are read whole, so the model can be built and measured as usual.
STREAM_ABOVE = 1 << 30
T = TypeVar("T")


def why_not(source: Path, output: Path, config: TransformConfig) -> str | None:
    """Why ``config`` cannot stream ``source`` to ``output`` (None: it can)."""
    calibrated = (
        isinstance(config, PruneConfig)
        and config.method in ("wanda", "sparsegpt")
        or isinstance(config, QuantizeConfig)
        and config.method == "gptq"
    )
    if isinstance(config, PruneConfig):
        if config.method not in ("magnitude", "2:4", "wanda", "sparsegpt"):
            return f"--method {config.method} needs the whole model (magnitude, 2:4 / N:M, wanda and sparsegpt pruning stream)"
    elif not isinstance(config, QuantizeConfig):
        return f"{config.transform} trains a model"
    if not (source.is_dir() or checkpoint.is_safetensors(source)):
        return "the input is not safetensors"
    if calibrated:
        ckpt = checkpoint.load(source, lazy=True)  # the header: names and shapes
        if ckpt.encodings or blocks.skeleton(ckpt.model, ckpt.tensors) is None:
            return f"--method {config.method} streams a Hugging Face causal LM stored in float only (calibrated one block at a time)"
    return None


def wanted(
    source: str | os.PathLike[str], output: str | os.PathLike[str], config: TransformConfig, stream: bool | None, progress: Progress = NULL
) -> bool:
    """Whether to stream: ``stream`` True (an error when it cannot), False, or None (auto: when it
    can and the input is larger than ``STREAM_ABOVE``; when it cannot, ``progress`` says why the
    large input is read whole)."""
    src = Path(source)
    if stream is False or not src.exists():
        return False  # a missing input gets the usual error from the reader
    size = checkpoint.disk_size(src)
    if stream is None and size <= STREAM_ABOVE:
        return False  # small: read whole, without asking why_not (which builds a gptq / wanda model's skeleton)
    why = why_not(src, Path(output), config)
    if stream and why is not None:
        raise UsageError(f"--stream: cannot stream this transform: {why}; leave out --stream to run it in memory")
    if why is not None:
        progress.log(f"{src}: {size / 1e9:.1f} GB, read whole into memory (not streamed: {why})")
    return why is None


def run(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: TransformConfig,
    *,
    loader: ModelLoader,
    options: MeasureOptions,
    progress: Progress,
    data: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    force: bool = False,
    measure: bool = True,
    allow_nonfinite: bool = False,
    max_shard_size: int = 5 * 10**9,
    on_saved: Callable[[Path], None] | None = None,
) -> Comparison:
    """``pipeline.run`` for a transform that streams (see the module's docstring): the same output,
    and the same comparison when the input is small enough to build, else the static figures."""
    src, out = Path(source), Path(output)
    before = checkpoint.stamp(src)
    ckpt = checkpoint.load(src, lazy=True)
    # Small enough to build: measured as in memory (models timed, the allocator set for them);
    # else static figures only, and freed blocks go back to the system at once.
    small = loader.can_build(ckpt) and checkpoint.disk_size(src) <= STREAM_ABOVE
    built = measure and small
    if not built:
        allocator.for_streaming()
    reads = tuple(Path(p) for p in (data, eval_data) if p is not None)
    hf_out = src.is_dir() and out.suffix != ".safetensors"
    checkpoint.check_output(out, force=force, source=src, inputs=reads, directory=hf_out)
    dataset = load_data(data, model=src) if data is not None else None  # calibration (gptq, wanda)
    evaluation = load_data(eval_data, model=src) if eval_data is not None else dataset
    if small:  # small enough to build: bad data is exit 2 before any work, nothing written
        check_data(checkpoint.load(src), loader, [dataset, evaluation], options.torch_device())
    ctx = Context(loader=loader, data=dataset, device=options.torch_device(), progress=progress, source=src, output=out)
    digest: list[str] = []
    hasher = threading.Thread(target=lambda: digest.append(checkpoint.sha256(src)), daemon=True)  # reads beside the transform
    hasher.start()
    spool_at = out.with_name(f"{out.name}-spool")
    for left in (spool_at, out.with_name(f"{out.name}-spool-hf")):  # by a run that was killed
        checkpoint.remove_stale_temps(left)
    with pinned_threads(config.threads), _Spool(spool_at.with_name(f".{spool_at.name}.{os.getpid()}.tmp")) as spool:
        walk = _Walk(ckpt, spool, allow_nonfinite)
        if isinstance(config, PruneConfig):
            _prune(walk, config, ctx)
        else:
            _quantize(walk, config, ctx)  # type: ignore[arg-type] (why_not lets only these two through)
        hasher.join()
        new = Checkpoint(tensors={}, model=ckpt.model, encodings=walk.encodings, plan=ckpt.plan)
        if new.model is None:
            new.model = loader.spec_for(ckpt)
        entry = {"transform": config.transform, "config": config.to_dict(), "source_sha256": digest[0], "infercomp_version": __version__}
        new.history = [*ckpt.history, entry]
        notes: list[str] = []  # about the output's form: logged, and in the output's report
        checkpoint.check_unchanged(src, before)  # the output would mix two versions of the input
        if hf_out:
            notes = _write_directory(src, out, new, spool, force=force, max_shard_size=max_shard_size, progress=progress)
        else:
            spool.write(out, sorted(spool.index), new.metadata(), exclusive=not force)
    with checkpoint.after_write(out, on_kept=on_saved):  # exit 2 from here on removes the output; an interrupt keeps it
        result = _compared(src, out, ckpt, walk, built, evaluation, loader=loader, options=options, measure=measure, progress=progress)
    if on_saved is not None:
        on_saved(out)
    result.models[-1].notes[:0] = notes
    return result


def _compared(
    src: Path,
    out: Path,
    ckpt: Checkpoint,
    walk: _Walk,
    built: bool,
    evaluation: Dataset | None,
    *,
    loader: ModelLoader,
    options: MeasureOptions,
    measure: bool,
    progress: Progress,
) -> Comparison:
    """The input and the written output compared: measured when the model is small enough to
    build, else static figures read tensor by tensor."""
    if built:
        result = compare([checkpoint.load(src), checkpoint.load(out)], loader=loader, options=options, data=evaluation, progress=progress)
    else:
        # Static figures, read tensor by tensor: the same numbers the in-memory path gives without a model.
        # Non-zeros the walk counted are not read again (the input's, and the output's it knows).
        counted = [walk.counted, walk.out_counted]
        result = compare(
            [ckpt, checkpoint.load(out, lazy=True)], loader=loader, options=options, progress=progress, run_models=False, counted=counted
        )
        if measure and loader.can_build(ckpt):
            for m in result.models:
                m.notes.append(f"streamed (input over {STREAM_ABOVE >> 20} MiB): static figures only, the model was not built")
    return result


# ---------------------------------------------------------------------------------- the walk


class _Walk:
    """The input's logical tensors in the in-memory path's order (plain ones as stored, then the
    encoded ones), read one at a time, and what the transform stores of each (into the spool).
    Counts the non-zeros of what it reads (``counted``) and of what it stores when it knows them
    without decoding (``out_counted``), so that the static comparison need not read them again."""

    def __init__(self, ckpt: Checkpoint, spool: _Spool, allow_nonfinite: bool):
        self.ckpt, self.spool, self.allow_nonfinite = ckpt, spool, allow_nonfinite
        self.owned = formats.stored_keys(ckpt.encodings, ckpt.name)
        # Shape-and-dtype stand-ins of the logical tensors, in order: what selection reads.
        self.logical = formats.stand_ins(checkpoint.shapes_of(ckpt.tensors), ckpt.encodings, ckpt.name)
        self.encodings: dict[str, Spec] = {}
        self.counted: dict[str, int] = {}  # logical name -> non-zeros (as ``measure.static_stats`` counts)
        self.out_counted: dict[str, int] = {}

    def parts(self, name: str, *, check: bool = True) -> dict[str, torch.Tensor]:
        """The stored tensors of logical tensor ``name`` as they are, checked finite."""
        keys = self.owned.get(name, [name])
        parts = {k: self.ckpt.tensors[k] for k in keys if k in self.ckpt.tensors}
        if check and not self.allow_nonfinite:
            checkpoint.check_finite(Checkpoint(tensors=parts, path=self.ckpt.path))
        return parts

    def dense(self, name: str, *, check: bool = True, count: bool = False) -> torch.Tensor:
        """The logical (decoded) tensor ``name`` (checked finite unless ``check`` is False: the
        threshold passes leave it to the pass that writes); ``count``: its non-zeros noted."""
        spec = self.ckpt.encodings.get(name)
        parts = self.parts(name, check=check)
        t = parts[name] if spec is None else formats.decode(parts, name, spec, self.ckpt.name)
        if count:
            self.note(name, t)
        return t

    def note(self, name: str, t: torch.Tensor) -> None:
        """Count the non-zeros of the input's logical tensor ``t``."""
        if is_weight(name, t):
            self.counted[name] = count_nonzero(t)

    def keep(self, name: str) -> None:
        """Store ``name`` as it was stored (encoded ones stay encoded)."""
        spec = self.ckpt.encodings.get(name)
        parts = self.parts(name)
        self.put(name, parts, spec)
        if spec is None:  # the same stored bytes: the same logical tensor
            self.note(name, parts[name])
            if name in self.counted:
                self.out_counted[name] = self.counted[name]

    def put(self, name: str, stored: dict[str, torch.Tensor], spec: Spec | None) -> None:
        for k, t in stored.items():
            self.spool.add(k, t)
        if spec is not None:
            self.encodings[name] = spec


def ahead(fn: Callable[[str], T], names: Iterable[str]) -> Iterator[tuple[str, T]]:
    """``(name, fn(name))`` in order, the next one made on a thread while the caller works on this
    one (reading from disk and checking overlap the transform; two tensors in memory at most)."""
    todo = list(names)
    with ThreadPoolExecutor(1, thread_name_prefix="infercomp-read") as pool:
        nxt: Future[T] | None = pool.submit(fn, todo[0]) if todo else None
        for i, name in enumerate(todo):
            assert nxt is not None
            value = nxt.result()
            nxt = pool.submit(fn, todo[i + 1]) if i + 1 < len(todo) else None
            yield name, value
            del value


def _prune(walk: _Walk, config: PruneConfig, ctx: Context) -> None:
    pattern = config.pattern()
    masks: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}  # --bias-correction's, stored in place of the input's
    early: set[str] = set()  # stored as calibration finished them
    if config.method in ("wanda", "sparsegpt"):  # calibrated block by block on the lazily read file (infercomp.blocks)

        def store(name: str, pruned: torch.Tensor, mask: torch.Tensor) -> None:  # each block's, as it is done
            _encode(walk, name, pruned, mask, pattern)
            early.add(name)

        if config.method == "wanda":
            masks = wanda_masks(walk.ckpt, walk.ckpt.tensors, config, ctx, on_done=store, biases=biases)
        else:
            sparsegpt_weights(walk.ckpt, walk.ckpt.tensors, config, ctx, on_done=store)
        targets: Mapping[str, Any] = {**masks, **dict.fromkeys(early)}
    else:
        targets = magnitude_targets(walk.ckpt, walk.logical, config, ctx)
    note_pattern(pattern, ctx)
    selection, left = None, 0
    if pattern is None and config.scope == "global":
        total = sum(t.numel() for t in targets.values())

        def weights() -> Iterator[torch.Tensor]:
            return (t for _, t in ahead(lambda n: walk.dense(n, check=False), targets))

        k = kept_count(total, config.sparsity)
        with ctx.progress.task("global threshold: histograms of the weights", total=None):
            # A few pages of each weight guess where the threshold lies: one pass when it holds.
            # (Not from encoded weights: sampling them would decode each whole, a pass of its own.)
            plain = not any(n in walk.ckpt.encodings for n in targets)
            window = near((walk.dense(n, check=False) for n in targets), k, magnitudes=True) if plain else None
            selection = Selection.of(weights, k, magnitudes=True, window=window)
        left = selection.ties

    # One weight at a time (encoding it beside the next one's masking was faster but broke 1 GB).
    with ctx.progress.task(f"pruning {len(targets)} weights (streamed)", total=len(walk.logical)) as task:
        for name in walk.logical:
            if name in early:
                walk.dense(name, count=True)  # stored already: read again only to check and count it
            elif name in biases:
                walk.dense(name, count=True)  # checked and counted as read; stored corrected
                walk.put(name, {name: biases.pop(name)}, None)
            elif name not in targets:
                walk.keep(name)
            else:
                w = walk.dense(name, count=True)
                if masks:
                    mask = masks.pop(name)
                elif selection is None:
                    mask = tensor_mask(w, config)
                else:
                    mask, left = selection.cut(w, left, magnitudes=True)
                _encode(walk, name, w, mask, pattern)
                del w, mask
            task.advance()


def _encode(walk: _Walk, name: str, w: torch.Tensor, mask: torch.Tensor, pattern: tuple[int, int] | None) -> None:
    stored, spec = encode_pruned(name, w, mask, pattern)
    walk.put(name, stored, spec)
    # The bitmask form decodes to the pruned weight bit for bit (-0.0 as 0.0): its non-zeros are
    # the encoder's nnz, or the stored tensor's own when it stays dense.
    walk.out_counted[name] = int(spec["nnz"]) if spec is not None and "nnz" in spec else count_nonzero(stored[name])


def _quantize(walk: _Walk, config: QuantizeConfig, ctx: Context) -> None:
    cast = config.scheme in CASTS
    chosen = {} if cast else quantized_weights(walk.ckpt, walk.logical, config, ctx)
    # GPTQ: integers chosen block by block on the lazily read file (infercomp.blocks) and stored
    # as each layer's are chosen; the rest RTN.
    early: set[str] = set()  # stored as calibration finished them

    def store(name: str, qz: Quantized) -> None:
        walk.put(name, *quantize_tensor(name, walk.logical[name], config, qz))  # the stand-in gives shape and dtype
        early.add(name)

    if config.method == "gptq":
        gptq_integers(walk.ckpt, walk.ckpt.tensors, chosen, config, ctx, on_done=store)
    was_cast = 0
    with ctx.progress.task(f"quantizing to {config.scheme} (streamed)", total=len(walk.logical)) as task:
        for name in walk.logical:  # not read ahead: a second tensor in memory would break 1 GB at 11008x4096
            t = walk.dense(name, count=True)
            if name in early:
                pass  # stored already: read again only to check and count it
            elif cast:
                stored, spec, did = cast_tensor(name, t, walk.ckpt.encodings.get(name), config)
                was_cast += did
                walk.put(name, stored, spec)
            elif name in chosen:
                walk.put(name, *quantize_tensor(name, t, config))
            else:
                walk.put(name, {name: t}, None)  # decoded, as the in-memory path keeps it
                if name in walk.counted:
                    walk.out_counted[name] = walk.counted[name]
            del t
            task.advance()
    if cast and not was_cast:
        raise UsageError(f"{walk.ckpt.name}: no tensor matches --include/--exclude; nothing to cast")
    if not cast:
        note_scheme(config, ctx)


def _write_directory(
    src: Path, out: Path, new: Checkpoint, spool: _Spool, *, force: bool, max_shard_size: int, progress: Progress
) -> list[str]:
    """A Hugging Face directory from what the walk spooled (``new``: its encodings and metadata):
    each logical tensor read back from the spool, made loadable by transformers
    (``hf.HFOutput``, as ``hf.output_checkpoint`` does in memory) into a second spool, then shards
    as ``checkpoint.save_dir`` splits them: the same directory as the in-memory path's."""
    config = dict((new.model or {}).get("config") or {})
    built = hf.HFOutput(hf.module_types(config))
    spooled = spool.tensors()
    owned = formats.stored_keys(new.encodings, str(out))
    shapes = formats.logical_shapes(checkpoint.shapes_of(spooled), new.encodings, str(out))
    with _Spool(out.with_name(f".{out.name}-spool-hf.{os.getpid()}.tmp")) as converted:
        with progress.task("writing the Hugging Face directory", total=len(shapes)) as task:
            for name in shapes:
                parts = {k: spooled[k] for k in owned.get(name, [name])}
                for k, t in built.add(name, parts, new.encodings.get(name), str(out)).items():
                    converted.add(k, t)
                del parts
                task.advance()
        hf_config, notes = built.config(config, shapes, str(src), sentence_transformers=(src / "modules.json").exists())
        notes += checkpoint.other_weights_notes(src)
        for note in notes:
            progress.log(note)
        written = Checkpoint(tensors={}, model=new.model, history=new.history, encodings={**built.kept, **built.ours}, plan=new.plan)
        meta = written.metadata()

        def weights(folder: Path) -> None:
            sizes = {n: converted.index[n][3] for n in sorted(converted.index)}
            for file, names in checkpoint.shard_plan(folder, sizes, max_shard_size):
                converted.write(file, names, meta)

        checkpoint.save_dir(None, out, source=src, config=hf_config, force=force, max_shard_size=max_shard_size, weights=weights)
    return notes


# ---------------------------------------------------------------------------------- the spool


class _Spool:
    """Stored tensors appended to a temp file as they are made; ``write`` assembles safetensors
    files from it. Each tensor's bytes are written on a thread while the walk transforms the next
    one (at most one write in flight, so one stored tensor more is held). Removed on exit,
    whatever happens."""

    def __init__(self, path: Path):
        self.path = path
        self.index: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # name -> dtype, shape, offset, bytes
        self.size = 0
        self._writing: Future[Any] | None = None

    def __enter__(self) -> _Spool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w+b")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="infercomp-spool")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._writer.shutdown(wait=True)  # no write may land after the unlink
        finally:
            self.f.close()
            self.path.unlink(missing_ok=True)

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()  # keeps t alive until written
        self._written()
        self.index[name] = (t.dtype, list(t.shape), self.size, data.nbytes)
        self.size += data.nbytes
        self._writing = self._writer.submit(self.f.write, memoryview(data))

    def _written(self) -> None:
        """Wait for the write in flight (its error, if any, is raised here)."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def tensors(self) -> checkpoint.LazyTensors:
        """What was added so far, read back lazily from the spool file."""
        self._written()
        self.f.flush()
        return checkpoint.lazy_ranges(
            self.path, {n: (offset, nbytes, dtype, shape) for n, (dtype, shape, offset, nbytes) in self.index.items()}
        )

    def write(self, path: Path, names: list[str], metadata: dict[str, str], *, exclusive: bool = False) -> None:
        """One safetensors file of ``names`` (sorted), atomically; the same bytes as
        ``checkpoint.write_safetensors`` of those tensors."""
        header = checkpoint.header_bytes([(n, *self.index[n][:2], self.index[n][3]) for n in names], metadata)

        def fill(f: IO[bytes]) -> None:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            f.flush()
            for n in names:
                _, _, offset, nbytes = self.index[n]
                self._copy(f, offset, nbytes)

        self._written()
        self.f.flush()
        checkpoint.write_atomic(path, fill, exclusive=exclusive)

    def _copy(self, f: IO[bytes], offset: int, nbytes: int) -> None:
        src, dst = self.f.fileno(), f.fileno()
        while nbytes > 0:
            try:
                done = os.copy_file_range(src, dst, min(nbytes, 1 << 30), offset)
            except (AttributeError, OSError):  # no copy_file_range here: through user space
                done = os.pwrite(dst, os.pread(src, min(nbytes, 1 << 24), offset), os.lseek(dst, 0, os.SEEK_CUR))
                os.lseek(dst, done, os.SEEK_CUR)
            if done <= 0:
                raise OSError(f"copying from {self.path} stopped short")
            offset += done
            nbytes -= done
