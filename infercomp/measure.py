"""Measurements: static size statistics, latency (interleaved, median/p90), accuracy, fidelity,
peak memory, and ``compare()``, which measures several checkpoints side by side.

Library code: returns numbers, never prints. Anything not measured stays None (JSON null).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import infercomp.formats as formats
from infercomp.checkpoint import Checkpoint
from infercomp.data import Dataset
from infercomp.errors import UsageError
from infercomp.metrics import accuracy, fidelity, sqnr
from infercomp.models import ModelLoader, example_batch, predict
from infercomp.progress import NULL, Progress

SCHEMA = "infercomp.report/1"


@dataclass(frozen=True)
class MeasureOptions:
    """How to measure (``--device``, ``--threads``, ``--batch-size``, ``--min-time``...).

    Attributes:
        latency: time the forward pass (needs a model); False skips it.
        layers: add a per-layer breakdown (size, sparsity, error against the baseline).
        memory: measure peak resident memory of load + one forward pass (a subprocess per model).
    """

    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 32
    warmup: int = 3
    min_time: float = 1.0
    latency: bool = True
    layers: bool = False
    memory: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.min_time < 0:
            raise UsageError(f"--min-time must be >= 0, got {self.min_time}")
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
    accuracy: float | None = None
    fidelity: dict[str, float] | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    accuracy_drop: float | None = None
    model: str | None = None
    history: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] | None = None


@dataclass
class Comparison:
    """Reports for several checkpoints; the first is the baseline."""

    settings: dict[str, Any]
    models: list[ModelReport]

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": SCHEMA, "settings": self.settings, "models": [asdict(m) for m in self.models]}
        for m in out["models"]:
            if m["layers"] is None:
                del m["layers"]
        return out


def is_weight(name: str, t: torch.Tensor) -> bool:
    """Counted as a parameter: floating-point and not a normalisation statistic."""
    return t.is_floating_point() and not name.endswith(_NOT_PARAMETERS)


def static_stats(ckpt: Checkpoint) -> dict[str, Any]:
    """Parameters, non-zeros, sparsity, bits per weight and dtype mix, from the tensors alone."""
    dense = formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    nbytes = formats.stored_bytes(ckpt.tensors, ckpt.encodings, ckpt.name)
    params = nonzero = 0
    bits = 0
    mix: dict[str, int] = {}
    for name, t in dense.items():
        if not is_weight(name, t):
            continue
        n = t.numel()
        params += n
        nonzero += int(torch.count_nonzero(t))
        bits += 8 * nbytes[name]
        spec = ckpt.encodings.get(name)
        kind = spec["codec"] if spec else str(ckpt.tensors[name].dtype).removeprefix("torch.")
        mix[kind] = mix.get(kind, 0) + n
    return {
        "parameters": params,
        "nonzero": nonzero,
        "sparsity": (1 - nonzero / params) if params else 0.0,
        "bits_per_weight": bits / params if params else None,
        "dtypes": {k: v / params for k, v in sorted(mix.items())} if params else {},
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int = 3,
    min_time: float = 1.0,
    min_runs: int = 10,
    max_runs: int = 100_000,
) -> list[list[float]]:
    """Run each function ``warmup`` times, then call them in turn (one call each per round) until
    every one has ``min_runs`` samples and ``min_time`` seconds in total. Returns seconds per call.
    Interleaving makes slow drift (thermal, other load) hit all candidates alike; each round runs
    them in a fresh (seeded) random order so that no candidate always runs right after the same
    neighbour (caches and allocator state left by the previous model). A plain rotation would not
    do: it keeps every candidate's predecessor the same."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    gen = torch.Generator().manual_seed(0)
    rnd = 0
    while True:
        for i in torch.randperm(len(fns), generator=gen).tolist():
            t0 = time.perf_counter()
            fns[i]()
            sync(device)
            times[i].append(time.perf_counter() - t0)
        rnd += 1
        if rnd >= max_runs or (rnd >= min_runs and all(sum(t) >= min_time for t in times)):
            return times


def summarise(samples: Sequence[float]) -> dict[str, float]:
    """Median / p90 / mean in milliseconds, plus how many runs they come from."""
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return {"median": statistics.median(ms), "p90": p90, "mean": statistics.fmean(ms), "runs": len(ms)}


def peak_memory(path: str, spec: dict[str, Any], batch_shape: Sequence[int], device: torch.device) -> int | None:
    """Peak RSS of loading ``path`` and one forward pass on a batch of ``batch_shape``, measured in
    a fresh Python process (see ``infercomp.memprobe``). None if the probe fails."""
    cmd = [sys.executable, "-m", "infercomp.memprobe", path, "--spec", json.dumps(spec), "--input-shape", json.dumps(list(batch_shape))]
    cmd += ["--device", str(device)]
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
    """One checkpoint being compared: its tensors, its report row, and its module (None when no
    model code is known)."""

    ckpt: Checkpoint
    report: ModelReport
    module: nn.Module | None = None


def compare(
    ckpts: Sequence[Checkpoint],
    *,
    loader: ModelLoader,
    options: MeasureOptions,
    data: Dataset | None = None,
    progress: Progress = NULL,
    run_models: bool = True,
) -> Comparison:
    """Measure every checkpoint; the first is the baseline for ratios and fidelity. With
    ``run_models=False`` only the static figures (size, parameters, sparsity) are taken."""
    device = options.torch_device()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    settings: dict[str, Any] = {
        **host_settings(device, torch.get_num_threads()),
        "batch_size": options.batch_size,
        "data": str(data.path) if data is not None else None,
        "warmup": options.warmup,
        "min_time_s": options.min_time,
    }
    entries = [_Entry(c, _static_report(c)) for c in ckpts]
    if not run_models:
        _ratios([e.report for e in entries])
        return Comparison(settings=settings, models=[e.report for e in entries])
    with progress.task("loading models", total=len(entries)) as task:
        for e in entries:
            if loader.can_build(e.ckpt):
                e.module = loader.build(e.ckpt).to(device)
                e.report.model = (loader.spec_for(e.ckpt) or {}).get("ref")
            else:
                e.report.notes.append("no model reference: latency and accuracy not measured (pass --model)")
            task.advance()
    if data is not None:
        _accuracy_and_fidelity(entries, data, options, device, progress)
    if options.latency:
        _latency(entries, loader, data, options, device, progress)
    if options.memory:
        _memory(entries, loader, data, options, device, progress)
    if options.layers:
        _layers(entries)
    _ratios([e.report for e in entries])
    return Comparison(settings=settings, models=[e.report for e in entries])


def _static_report(c: Checkpoint) -> ModelReport:
    return ModelReport(
        path=c.name,
        size_bytes=c.size_bytes,
        history=[h.get("transform", "?") for h in c.history],
        model=(c.model or {}).get("ref"),
        **static_stats(c),
    )


def _accuracy_and_fidelity(entries: list[_Entry], data: Dataset, options: MeasureOptions, device: torch.device, progress: Progress) -> None:
    baseline: torch.Tensor | None = None
    with progress.task("evaluating", total=len(entries)) as task:
        for i, e in enumerate(entries):
            if e.module is not None:
                out = predict(e.module, data, batch_size=options.batch_size, device=device)
                if data.labels is not None:
                    e.report.accuracy = accuracy(out, data.labels)
                if i == 0:
                    baseline = out
                if baseline is not None and out.shape == baseline.shape:
                    e.report.fidelity = fidelity(out, baseline)
            task.advance()


def _latency(
    entries: list[_Entry], loader: ModelLoader, data: Dataset | None, options: MeasureOptions, device: torch.device, progress: Progress
) -> None:
    runnable = [e for e in entries if e.module is not None]
    if not runnable:
        return
    x = example_batch(runnable[0].ckpt, loader, runnable[0].module, options.batch_size, data)
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
    entries: list[_Entry], loader: ModelLoader, data: Dataset | None, options: MeasureOptions, device: torch.device, progress: Progress
) -> None:
    with progress.task("peak memory (one process per model)", total=len(entries)) as task:
        for e in entries:
            x = None if e.module is None or e.ckpt.path is None else example_batch(e.ckpt, loader, e.module, options.batch_size, data)
            if x is None or not x.is_floating_point():
                e.report.notes.append("peak memory not measured: needs a model, a file on disk and a float input")
            else:
                e.report.peak_memory_bytes = peak_memory(str(e.ckpt.path), loader.spec_for(e.ckpt), list(x.shape), device)
            task.advance()


def _layers(entries: list[_Entry]) -> None:
    """Per-layer size / sparsity, and SQNR (dB) of each weight against the baseline's."""
    first = entries[0].ckpt
    base = formats.logical_tensors(first.tensors, first.encodings, first.name)
    for e in entries:
        c = e.ckpt
        dense = formats.logical_tensors(c.tensors, c.encodings, c.name)
        nbytes = formats.stored_bytes(c.tensors, c.encodings, c.name)
        rows = []
        for name, t in dense.items():
            if not is_weight(name, t) or t.dim() < 2:
                continue
            row: dict[str, Any] = {
                "name": name,
                "shape": list(t.shape),
                "stored": c.encodings[name]["codec"] if name in c.encodings else str(c.tensors[name].dtype).removeprefix("torch."),
                "bytes": nbytes[name],
                "sparsity": 1 - int(torch.count_nonzero(t)) / t.numel(),
                "sqnr_db": None,
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
        if r.accuracy is not None and base.accuracy is not None:
            r.accuracy_drop = base.accuracy - r.accuracy
