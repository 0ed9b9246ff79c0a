"""Measurements: static size statistics, latency (interleaved, median/p90), accuracy, fidelity,
peak memory, and ``compare()``, which measures several checkpoints side by side.

Library code: returns numbers, never prints. Anything not measured stays None (JSON null).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import infercomp.allocator as allocator
import infercomp.formats as formats
from infercomp.checkpoint import Checkpoint, shapes_of
from infercomp.compute import ComputeInfo, check_mode
from infercomp.data import Dataset
from infercomp.errors import DataError, UsageError
from infercomp.formats.base import count_nonzero
from infercomp.kernels import Int8Linear, cpu_features
from infercomp.metrics import accuracy, fidelity, next_token_nll, sqnr
from infercomp.models import ModelLoader, Task, call, example_batch, first_output, predict, task_for
from infercomp.progress import NULL, Progress
from infercomp.timing import summarise, time_interleaved

SCHEMA = "infercomp.report/1"


@dataclass(frozen=True)
class MeasureOptions:
    """How to measure (``--device``, ``--threads``, ``--batch-size``, ``--min-time``...).

    Attributes:
        latency: time the forward pass (needs a model); False skips it.
        layers: add a per-layer breakdown (size, sparsity, error against the baseline).
        memory: measure peak resident memory of load + one forward pass (a subprocess per model).
        compute: how the models run on the CPU: ``auto``, ``fp32``, ``bf16`` or ``int8`` (see
            ``infercomp.compute``).
        compile: run the models under ``torch.compile`` (compiled during the warm-up runs).
    """

    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 32
    warmup: int = 3
    min_time: float = 1.0
    latency: bool = True
    layers: bool = False
    memory: bool = False
    compute: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        check_mode(self.compute)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if not (math.isfinite(self.min_time) and self.min_time >= 0):
            raise UsageError(f"--min-time must be a finite number >= 0, got {self.min_time}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"--device {self.device!r} is not supported; use cpu or cuda")

    def torch_device(self) -> torch.device:
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available on this machine (torch.cuda.is_available() is False)")
        return dev


# Float buffers that are statistics, not weights: left out of the parameter count.
_NOT_PARAMETERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class ModelReport:
    """One row of a comparison. Keys follow the ``infercomp.report/1`` schema (docs/report-json.md)."""

    path: str
    size_bytes: int | None = None
    parameters: int | None = None
    nonzero: int | None = None
    sparsity: float | None = None
    bits_per_weight: float | None = None
    dtypes: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] | None = None
    throughput_per_s: float | None = None
    peak_memory_bytes: int | None = None
    weight_memory_bytes: int | None = None
    accuracy: float | None = None
    fidelity: dict[str, float] | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    accuracy_drop: float | None = None
    model: str | None = None
    compute: dict[str, Any] | None = None
    history: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] | None = None
    perplexity: float | None = None
    task: str | None = None


@dataclass
class Comparison:
    """Reports for several checkpoints; the first is the baseline."""

    settings: dict[str, Any]
    models: list[ModelReport]
    sensitivity: dict[str, Any] | None = None  # report --sensitivity (infercomp.sensitivity)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA, "settings": self.settings, "models": [asdict(m) for m in self.models]}
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity
        for m in out["models"]:
            if m["layers"] is None:
                del m["layers"]
        return out


def is_weight(name: str, t: torch.Tensor) -> bool:
    """Counted as a parameter: floating-point and not a normalisation statistic."""
    return t.is_floating_point() and not name.endswith(_NOT_PARAMETERS)


def static_stats(ckpt: Checkpoint, counted: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Parameters, non-zeros, sparsity, bits per weight and dtype mix, from the tensors alone (one
    at a time: a checkpoint read with ``checkpoint.load(lazy=True)`` stays in bounded memory).
    ``counted``: non-zeros of logical tensors already counted (by a streamed transform), not read."""
    shapes = shapes_of(ckpt.tensors)
    dense = formats.LogicalView(ckpt.tensors, ckpt.encodings, ckpt.name, shapes=shapes)
    nbytes = formats.stored_bytes(shapes, ckpt.encodings, ckpt.name)
    params = nonzero = 0
    bits = 0
    mix: dict[str, int] = {}
    for name, stand_in in dense.order.items():
        if not is_weight(name, stand_in):
            continue
        n = stand_in.numel()
        params += n
        spec = ckpt.encodings.get(name)
        known = counted.get(name) if counted is not None else None
        if known is None and spec is not None:
            known = formats.nonzero(ckpt.tensors, name, spec, ckpt.name)  # integers counted, not decoded
        if known is not None:
            nonzero += known
        else:
            t = dense[name]
            nonzero += count_nonzero(t)
        bits += 8 * nbytes[name]
        kind = spec["codec"] if spec else str(shapes[name].dtype).removeprefix("torch.")
        mix[kind] = mix.get(kind, 0) + n
    return {
        "parameters": params,
        "nonzero": nonzero,
        "sparsity": (1 - nonzero / params) if params else 0.0,
        "bits_per_weight": bits / params if params else None,
        "dtypes": {k: v / params for k, v in sorted(mix.items())} if params else {},
    }


def peak_memory(path: str, spec: dict[str, Any], batch_shape: Sequence[int], device: torch.device, compute: str = "fp32") -> int | None:
    """Peak RSS of loading ``path`` to run as ``compute`` and one forward pass on a batch of
    ``batch_shape``, measured in a fresh Python process (see ``infercomp.memprobe``). None if
    the probe fails."""
    cmd = [sys.executable, "-m", "infercomp.memprobe", path, "--spec", json.dumps(spec), "--input-shape", json.dumps(list(batch_shape))]
    cmd += ["--device", str(device), "--compute", compute]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return None
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_memory_bytes"])
    except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return None  # not measured: null in the report, never a guess


def host_settings(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": device.type,
        "threads": threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------- compare


@dataclass
class _Entry:
    """One checkpoint being compared: its tensors, its report row, its module (None when no
    model code is known) and what that module runs."""

    ckpt: Checkpoint
    report: ModelReport
    module: nn.Module | None = None
    compute: ComputeInfo | None = None


def compare(
    ckpts: Sequence[Checkpoint],
    *,
    loader: ModelLoader,
    options: MeasureOptions,
    data: Dataset | None = None,
    progress: Progress = NULL,
    run_models: bool = True,
    counted: Sequence[Mapping[str, int] | None] = (),
) -> Comparison:
    """Measure every checkpoint; the first is the baseline for ratios and fidelity. With
    ``run_models=False`` only the static figures (size, parameters, sparsity) are taken.
    ``counted``: per checkpoint, non-zeros already counted (``static_stats``)."""
    device = options.torch_device()
    if options.threads is not None:
        cores = os.cpu_count() or 1
        if options.threads > cores:
            progress.log(f"--threads {options.threads} is more than this machine's {cores} cores; using {cores}")
        torch.set_num_threads(min(options.threads, cores))
    settings: dict[str, Any] = {
        **host_settings(device, torch.get_num_threads()),
        "batch_size": options.batch_size,
        "data": str(data.path) if data is not None else None,
        "warmup": options.warmup,
        "min_time_s": options.min_time,
        "compute": options.compute,
        "compile": options.compile,
        "cpu_features": cpu_features(),
    }
    entries = [_Entry(c, _static_report(c, counted[i] if i < len(counted) else None)) for i, c in enumerate(ckpts)]
    if not run_models:
        _ratios([e.report for e in entries])
        return Comparison(settings=settings, models=[e.report for e in entries])
    example = _build(entries, loader, data, options, device, progress)
    if device.type == "cpu" and any(e.module is not None for e in entries):
        settings["allocator"] = allocator.state()  # what the models ran under (set by the build)
    if data is not None:
        _accuracy_and_fidelity(entries, data, options, device, progress)
    if options.latency:
        _latency(entries, example, options, device, progress)
    if options.memory:
        _memory(entries, loader, example, options, device, progress)
    if options.layers:
        _layers(entries)
    _ratios([e.report for e in entries])
    return Comparison(settings=settings, models=[e.report for e in entries])


def _build(
    entries: list[_Entry], loader: ModelLoader, data: Dataset | None, options: MeasureOptions, device: torch.device, progress: Progress
) -> torch.Tensor | None:
    """Build each model to run as ``options.compute`` says. Returns the example batch (the first
    ``batch_size`` samples of --data, else noise of the first model's input shape): latency is
    timed on it, and an ``auto`` choice is made on it, so what is chosen is what is measured."""
    example: torch.Tensor | None = None

    def first_example(ckpt: Checkpoint) -> Callable[[nn.Module], torch.Tensor | None]:
        def make(module: nn.Module) -> torch.Tensor | None:
            nonlocal example
            if example is None:
                example = example_batch(ckpt, loader, module, options.batch_size, data)
            return example

        return make

    with progress.task(f"loading models (compute {options.compute})", total=len(entries)) as task:
        for e in entries:
            if not loader.can_build(e.ckpt):
                e.report.notes.append("no model reference: latency and accuracy not measured (pass --model)")
                task.advance()
                continue
            e.module, e.compute = loader.build_for_inference(
                e.ckpt, compute=options.compute, device=device, example=first_example(e.ckpt), compile=options.compile
            )
            if example is None and device.type != "cpu":
                example = example_batch(e.ckpt, loader, e.module, options.batch_size, data)
            e.report.model = (loader.spec_for(e.ckpt) or {}).get("ref")
            e.report.weight_memory_bytes = weight_memory(e.module)
            e.report.compute = {k: v for k, v in asdict(e.compute).items() if k != "kernels"}
            if e.compute.note:
                e.report.notes.append(f"compute: {e.compute.note}")
            task.advance()
    return example


def weight_memory(module: nn.Module) -> int:
    """Bytes the built model's weights take in memory (parameters, buffers, and the int8 layers'
    own tensors): what the chosen compute mode costs in RAM, next to the file's size on disk."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return total + sum(m.weight_bytes() for m in module.modules() if isinstance(m, Int8Linear))


def _static_report(c: Checkpoint, counted: Mapping[str, int] | None = None) -> ModelReport:
    return ModelReport(
        path=c.name,
        size_bytes=c.size_bytes,
        history=[h.get("transform", "?") for h in c.history],
        model=(c.model or {}).get("ref"),
        **static_stats(c, counted),
    )


def _accuracy_and_fidelity(entries: list[_Entry], data: Dataset, options: MeasureOptions, device: torch.device, progress: Progress) -> None:
    """Accuracy (classifiers with labels), perplexity (causal LMs) and fidelity against the
    baseline, each model scored as its task says (``models.Task``)."""
    tasks: dict[int, Task] = {}
    for i, e in enumerate(entries):
        if e.module is not None:
            tasks[i] = task_for(e.ckpt, e.module, fallback=tasks.get(0))
    lms = [i for i, t in tasks.items() if t.kind == "causal-lm"]
    if lms:
        _language_models([entries[i] for i in lms], data, options, device, progress, baseline=entries[0] if 0 in lms else None)
    baseline: torch.Tensor | None = None
    with progress.task("evaluating", total=len(tasks) - len(lms)) as bar:
        for i, t in tasks.items():
            if t.kind == "causal-lm":
                continue
            e = entries[i]
            out = _guarded(e.ckpt.name, data, predict, e.module, data, batch_size=options.batch_size, device=device, task=t)
            if t.kind == "outputs" and out.dim() == 2:
                t = Task("classifier")
            e.report.task = t.kind
            if t.note:
                e.report.notes.append(t.note)
            if data.labels is not None:
                if t.kind == "classifier":
                    _check_labels(data, out)
                    e.report.accuracy = accuracy(out, data.labels)
                else:
                    e.report.notes.append(f"accuracy not measured: the model's outputs are not class scores ({t.kind}), 'labels' unused")
            if i == 0:
                baseline = out
            if baseline is not None and out.shape == baseline.shape:
                e.report.fidelity = fidelity(out, baseline, kind="embedding" if t.kind == "sentence-embedding" else t.kind)
            bar.advance()


def _language_models(
    lms: list[_Entry], data: Dataset, options: MeasureOptions, device: torch.device, progress: Progress, *, baseline: _Entry | None
) -> None:
    """Perplexity on --data (each next real token scored; padding ignored), and agreement with
    the baseline's next-token distributions at every real token. Batch by batch, all models on
    the same batch, so that only one batch of (B, T, vocab) logits per model is ever held."""
    if data.inputs.is_floating_point() or data.inputs.dim() != 2:
        shape = tuple(data.inputs.shape)
        raise DataError(f"{data.path}: a causal LM reads token ids (N, T), e.g. text --data; got {data.inputs.dtype} of shape {shape}")
    mask_all = data.attention_mask if data.attention_mask is not None else torch.ones_like(data.inputs)
    nll = {id(e): (0.0, 0) for e in lms}
    parts: dict[int, list[tuple[int, dict[str, float | None]]]] = {id(e): [] for e in lms}
    steps = -(-len(data) // options.batch_size)
    with progress.task(f"evaluating {len(lms)} language model(s)", total=steps) as bar:
        for start in range(0, len(data), options.batch_size):
            x = data.inputs[start : start + options.batch_size].to(device)
            mask = mask_all[start : start + options.batch_size].to(device)
            ref: torch.Tensor | None = None
            for e in lms:
                with torch.inference_mode():
                    logits = first_output(_guarded(e.ckpt.name, data, call, e.module, x, mask)).float().cpu()  # (B, T, V)
                total, count = nll[id(e)]
                s, n = next_token_nll(logits, x.cpu(), mask.cpu())
                nll[id(e)] = (total + s, count + n)
                real = logits[mask.cpu().bool()]  # (tokens, V): one sample a real token
                if e is baseline:
                    ref = real
                if ref is not None and real.shape == ref.shape and real.shape[0]:
                    parts[id(e)].append((real.shape[0], fidelity(real, ref, kind="distribution")))
            bar.advance()
    for e in lms:
        total, count = nll[id(e)]
        e.report.task = "causal-lm"
        e.report.perplexity = math.exp(total / count) if count else None
        e.report.fidelity = _merge_fidelity(parts[id(e)]) if parts[id(e)] else None
        if data.labels is not None:
            e.report.notes.append("accuracy not measured: a causal LM is scored by perplexity on the next tokens, 'labels' unused")


def _merge_fidelity(parts: list[tuple[int, dict[str, float | None]]]) -> dict[str, float | None]:
    """Per-batch fidelity figures (tokens, figures) -> the figures over all tokens."""
    n = sum(k for k, _ in parts)

    def mean(key: str) -> float | None:
        values = [(k, f[key]) for k, f in parts]
        return None if any(v is None for _, v in values) else sum(k * v for k, v in values) / n

    return {
        "top1_agreement": mean("top1_agreement"),
        "cosine_mean": mean("cosine_mean"),
        "cosine_min": min(f["cosine_min"] for _, f in parts),
        "kl_div": mean("kl_div"),
    }


def check_data(ckpt: Checkpoint, loader: ModelLoader, datasets: Sequence[Dataset | None], device: torch.device) -> None:
    """Run the first samples of each of ``datasets`` (None: none given) through ``ckpt``'s model
    before any transform: a model that cannot take these inputs, or labels beyond its class
    scores, is a DataError now, before calibration and before an output is written (exit 2 leaves
    no output), instead of a traceback from inside a calibration pass. Text is tokenized for the
    model by its own tokenizer and needs no check; a model infercomp cannot build is checked where
    it is measured. The model is built once, only when some tensor data needs it."""
    tensors = list({id(d): d for d in datasets if d is not None and d.attention_mask is None}.values())
    if not tensors or not loader.can_build(ckpt):
        return
    module = loader.build(ckpt, runtime=False).to(device).eval()
    task = task_for(ckpt, module)
    if task.kind == "causal-lm":
        return
    for data in tensors:
        few = Dataset(inputs=data.inputs[:2], labels=None, path=data.path)
        with torch.inference_mode():
            out = _guarded(ckpt.name, data, predict, module, few, batch_size=2, device=device, task=task)
        if data.labels is not None and task.kind in ("outputs", "classifier") and out.dim() == 2:
            _check_labels(data, out)


def _guarded(name: str, data: Dataset, run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``run(*args, **kwargs)``: the model's outputs on --data; a model that cannot take these
    inputs is a DataError naming the file and the shape, not a traceback from inside its forward
    pass."""
    try:
        return run(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        shape = tuple(data.inputs.shape[1:])
        raise DataError(f"{data.path}: {name} cannot run on 'inputs' of shape {shape} ({data.inputs.dtype}): {detail}") from err


def _check_labels(data: Dataset, out: torch.Tensor) -> None:
    top = int(data.labels.max())
    if out.dim() < 2 or top >= out.shape[-1]:
        classes = out.shape[-1] if out.dim() >= 2 else "no"
        raise DataError(f"{data.path}: 'labels' go up to {top} but the model outputs {classes} class scores")


def _latency(entries: list[_Entry], x: torch.Tensor | None, options: MeasureOptions, device: torch.device, progress: Progress) -> None:
    runnable = [e for e in entries if e.module is not None]
    if not runnable:
        return
    if x is None:
        for e in runnable:
            e.report.notes.append("latency not measured: no input shape known (pass --data)")
        return
    x = x.to(device)

    def call(m: nn.Module) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.inference_mode():
                return m(x)

        return fn

    with progress.task(f"timing {len(runnable)} model(s), batch {options.batch_size}", total=None):
        times = time_interleaved([call(e.module) for e in runnable], device=device, warmup=options.warmup, min_time=options.min_time)
    for e, samples in zip(runnable, times):
        summary = summarise(samples)
        e.report.latency_ms = summary
        e.report.throughput_per_s = options.batch_size / (summary["median"] / 1000)


def _memory(
    entries: list[_Entry], loader: ModelLoader, x: torch.Tensor | None, options: MeasureOptions, device: torch.device, progress: Progress
) -> None:
    with progress.task("peak memory (one process per model)", total=len(entries)) as task:
        for e in entries:
            if e.module is None or e.ckpt.path is None or x is None or not x.is_floating_point() or e.compute is None:
                e.report.notes.append("peak memory not measured: needs a model, a file on disk and a float input")
            else:
                # The mode that ran (int8's split of the rest between fp32 and bf16 is cached by then).
                mode = e.compute.mode.partition("+")[0] if device.type == "cpu" else options.compute
                e.report.peak_memory_bytes = peak_memory(str(e.ckpt.path), loader.spec_for(e.ckpt), list(x.shape), device, mode)
            task.advance()


def _layers(entries: list[_Entry]) -> None:
    """Per-layer size / sparsity, SQNR (dB) of each weight against the baseline's, and the
    kernel that runs it."""
    first = entries[0].ckpt
    base = formats.LogicalView(first.tensors, first.encodings, first.name, shapes=shapes_of(first.tensors))  # one tensor at a time
    for e in entries:
        c = e.ckpt
        shapes = shapes_of(c.tensors)
        dense = formats.LogicalView(c.tensors, c.encodings, c.name, shapes=shapes)
        nbytes = formats.stored_bytes(shapes, c.encodings, c.name)
        rows = []
        for name, t in dense.items():
            if not is_weight(name, t) or t.dim() < 2:
                continue
            row: dict[str, Any] = {
                "name": name,
                "shape": list(t.shape),
                "stored": c.encodings[name]["codec"] if name in c.encodings else str(shapes[name].dtype).removeprefix("torch."),
                "bytes": nbytes[name],
                "sparsity": 1 - count_nonzero(t) / t.numel(),
                "sqnr_db": None,
                "kernel": None if e.compute is None else e.compute.kernels.get(name.rpartition(".")[0]),
            }
            ref = base.get(name)
            if ref is not None and ref.shape == t.shape:
                row["sqnr_db"] = sqnr(ref.float(), t.float())
            rows.append(row)
        e.report.layers = rows


def _ratios(reports: list[ModelReport]) -> None:
    base = reports[0]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    for r in reports:
        r.ratios = {
            "size": ratio(r.size_bytes, base.size_bytes),
            "parameters": ratio(r.parameters, base.parameters),
            "latency": ratio(r.latency_ms and r.latency_ms["median"], base.latency_ms and base.latency_ms["median"]),
        }
        if r.perplexity is not None or base.perplexity is not None:  # language models only: other reports keep their keys
            r.ratios["perplexity"] = ratio(r.perplexity, base.perplexity)
        if r.accuracy is not None and base.accuracy is not None:
            r.accuracy_drop = base.accuracy - r.accuracy
