"""The one pipeline every subcommand runs: load -> transform -> save -> compare.

``report`` is the same pipeline without a transform.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infercomp import __version__, checkpoint, measure
from infercomp.checkpoint import Checkpoint
from infercomp.config import TransformConfig
from infercomp.data import Dataset, load_data
from infercomp.errors import GateFailed, UsageError
from infercomp.measure import Comparison, ModelReport
from infercomp.models import ModelLoader, input_shape
from infercomp.progress import NULL, Progress


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


@dataclass
class Context:
    """What a transform may use besides the checkpoint and its config."""

    loader: ModelLoader
    data: Dataset | None
    device: torch.device
    progress: Progress = NULL
    source: Path | None = None
    output: Path | None = None


Transform = Callable[[Checkpoint, Any, Context], Checkpoint]


def transforms() -> dict[type, Transform]:
    """Config type -> transform function: the explicit dispatch table."""
    from infercomp.distill import DistillConfig, distill
    from infercomp.prune import PruneConfig, prune
    from infercomp.quantize import QuantizeConfig, quantize

    return {PruneConfig: prune, QuantizeConfig: quantize, DistillConfig: distill}


def run(
    source: str | Path,
    output: str | Path,
    config: TransformConfig,
    *,
    loader: ModelLoader,
    options: MeasureOptions,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    force: bool = False,
    progress: Progress = NULL,
    on_saved: Callable[[Path], None] | None = None,
) -> Comparison:
    """Load ``source``, apply the transform ``config`` describes, write ``output`` atomically, and
    compare the two (the output is read back from disk, so what is measured is what was written).
    ``data`` feeds the transform (calibration, training) and the comparison, unless ``eval_data``
    is given for the comparison. ``on_saved(output)`` runs once the output is safely written
    (distill drops its resumable training state there)."""
    src, out = Path(source), Path(output)
    ckpt = checkpoint.load(src)
    reads = tuple(Path(p) for p in (*config.inputs(), data, eval_data) if p is not None)
    checkpoint.check_output(out, force=force, source=src, inputs=reads)  # fail before any expensive work
    tokenizer = src if src.is_dir() else None  # a Hugging Face directory carries its tokenizer
    dataset = load_data(data, tokenizer=tokenizer) if data is not None else None
    device = options.torch_device()
    ctx = Context(loader=loader, data=dataset, device=device, progress=progress, source=src, output=out)
    fn = transforms()[type(config)]
    with progress.task(f"{config.transform}: {src.name}", total=None):
        new = fn(ckpt, config, ctx)
    if new.model is None:
        new.model = loader.spec_for(ckpt)
    new.history = [
        *ckpt.history,
        {
            "transform": config.transform,
            "config": config.to_dict(),
            "source_sha256": checkpoint.sha256(src),
            "infercomp_version": __version__,
        },
    ]
    checkpoint.save(new, out, force=force, source=src)
    if on_saved is not None:
        on_saved(out)
    written = checkpoint.load(out)
    # The output's model reference is stored in it (and the user's --model, if any, applies to both).
    evaluation = load_data(eval_data, tokenizer=tokenizer) if eval_data is not None else dataset
    return compare([ckpt, written], loader=loader, options=options, data=evaluation, progress=progress)


def compare(
    ckpts: Sequence[Checkpoint],
    *,
    loader: ModelLoader,
    options: MeasureOptions,
    data: Dataset | None = None,
    progress: Progress = NULL,
) -> Comparison:
    """Measure every checkpoint; the first is the baseline for ratios and fidelity."""
    device = options.torch_device()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    settings: dict[str, Any] = {
        **measure.host_settings(device, torch.get_num_threads()),
        "batch_size": options.batch_size,
        "data": str(data.path) if data is not None else None,
        "warmup": options.warmup,
        "min_time_s": options.min_time,
    }
    reports = [_static_report(c) for c in ckpts]
    modules: list[nn.Module | None] = []
    with progress.task("loading models", total=len(ckpts)) as task:
        for c, r in zip(ckpts, reports):
            if loader.can_build(c):
                modules.append(loader.build(c).to(device))
                spec = loader.spec_for(c)
                r.model = spec["ref"] if spec else None
            else:
                modules.append(None)
                r.notes.append("no model reference: latency and accuracy not measured (pass --model)")
            task.advance()
    if data is not None:
        _accuracy_and_fidelity(modules, reports, data, options, device, progress)
    if options.latency:
        _latency(ckpts, modules, reports, loader, data, options, device, progress)
    if options.memory:
        _memory(ckpts, modules, reports, loader, data, options, device, progress)
    if options.layers:
        _layers(ckpts, reports)
    _ratios(reports)
    return Comparison(settings=settings, models=reports)


def _static_report(c: Checkpoint) -> ModelReport:
    stats = measure.static_stats(c)
    return ModelReport(
        path=c.name,
        size_bytes=c.size_bytes,
        history=[h.get("transform", "?") for h in c.history],
        model=(c.model or {}).get("ref"),
        **stats,
    )


def _accuracy_and_fidelity(modules, reports, data: Dataset, options: MeasureOptions, device, progress: Progress) -> None:
    baseline: torch.Tensor | None = None
    with progress.task("evaluating", total=len(modules)) as task:
        for i, (m, r) in enumerate(zip(modules, reports)):
            if m is not None:
                out = measure.predict(m, data, batch_size=options.batch_size, device=device)
                if data.labels is not None:
                    r.accuracy = measure.accuracy(out, data.labels)
                if i == 0:
                    baseline = out
                if baseline is not None and out.shape == baseline.shape:
                    r.fidelity = measure.fidelity(out, baseline)
            task.advance()


def _latency(
    ckpts, modules, reports, loader: ModelLoader, data: Dataset | None, options: MeasureOptions, device, progress: Progress
) -> None:
    runnable = [(i, m) for i, m in enumerate(modules) if m is not None]
    if not runnable:
        return
    x = _latency_input(ckpts[runnable[0][0]], runnable[0][1], loader, data, options.batch_size)
    if x is None:
        for i, _ in runnable:
            reports[i].notes.append("latency not measured: no input shape known (pass --data)")
        return
    x = x.to(device)

    def call(m: nn.Module) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.inference_mode():
                return m(x)

        return fn

    with progress.task(f"timing {len(runnable)} model(s), batch {options.batch_size}", total=None):
        times = measure.time_interleaved([call(m) for _, m in runnable], device=device, warmup=options.warmup, min_time=options.min_time)
    for (i, _), samples in zip(runnable, times):
        summary = measure.summarise(samples)
        reports[i].latency_ms = summary
        reports[i].throughput_per_s = options.batch_size / (summary["median"] / 1000)


def _memory(
    ckpts, modules, reports, loader: ModelLoader, data: Dataset | None, options: MeasureOptions, device, progress: Progress
) -> None:
    with progress.task("peak memory (one process per model)", total=len(ckpts)) as task:
        for c, m, r in zip(ckpts, modules, reports):
            x = None if m is None or c.path is None else _latency_input(c, m, loader, data, options.batch_size)
            if x is None or not x.is_floating_point():
                r.notes.append("peak memory not measured: needs a model, a file on disk and a float input")
            else:
                r.peak_memory_bytes = measure.peak_memory(str(c.path), loader.spec_for(c), list(x.shape), device)
            task.advance()


def _latency_input(ckpt: Checkpoint, module: nn.Module, loader: ModelLoader, data: Dataset | None, batch: int) -> torch.Tensor | None:
    """One batch: the first ``batch`` samples of --data (repeated if fewer), else seeded noise of
    the model's known input shape."""
    if data is not None:
        reps = -(-batch // len(data))
        return data.inputs.repeat(reps, *([1] * (data.inputs.dim() - 1)))[:batch]
    shape = input_shape(ckpt, loader, module)
    if shape is None:
        return None
    return torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0))


def _layers(ckpts: Sequence[Checkpoint], reports: list[ModelReport]) -> None:
    """Per-layer size / sparsity, and SQNR (dB) of each weight against the baseline's."""
    from infercomp import encodings

    base = encodings.logical_tensors(ckpts[0].tensors, ckpts[0].encodings, ckpts[0].name)
    for c, r in zip(ckpts, reports):
        dense = encodings.logical_tensors(c.tensors, c.encodings, c.name)
        nbytes = encodings.stored_bytes(c.tensors, c.encodings, c.name)
        rows = []
        for name, t in dense.items():
            if not measure.is_weight(name, t) or t.dim() < 2:
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
        r.layers = rows


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB; None when identical (infinite)."""
    noise = (reference - approx).pow(2).sum()
    if float(noise) == 0.0:
        return None
    return float(10 * torch.log10(reference.pow(2).sum() / noise))


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


# ------------------------------------------------------------------------------------------ gates

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
_GATE = re.compile(r"^\s*([a-z_0-9.]+)\s*(<=|>=|<|>|==)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")
GATE_KEYS = (
    "accuracy",
    "accuracy_drop",
    "sparsity",
    "bits_per_weight",
    "size_ratio",
    "parameters_ratio",
    "latency_ratio",
    "top1_agreement",
    "cosine_mean",
    "cosine_min",
)


def parse_gate(text: str) -> tuple[str, str, float]:
    """``--fail-if 'accuracy_drop>0.01'`` -> (key, op, value)."""
    m = _GATE.match(text)
    try:
        if m and m.group(1) in GATE_KEYS:
            return m.group(1), m.group(2), float(m.group(3))
    except ValueError:  # '1.2.3' passes the pattern but is no number
        pass
    raise UsageError(f"--fail-if {text!r}: expected KEY OP NUMBER with KEY one of {', '.join(GATE_KEYS)} and OP one of <, <=, >, >=, ==")


def _gate_value(r: ModelReport, key: str) -> float | None:
    if key.endswith("_ratio"):
        return r.ratios.get(key.removesuffix("_ratio"))
    if key in ("top1_agreement", "cosine_mean", "cosine_min"):
        return None if r.fidelity is None else r.fidelity[key]
    return getattr(r, key)


def check_gates(comparison: Comparison, gates: Sequence[str]) -> None:
    """Raise GateFailed (exit 1) naming every gate that held true for a non-baseline model.
    A gate on a figure that was not measured fails too: a CI gate must not pass silently."""
    failures = []
    for text in gates:
        key, op, value = parse_gate(text)
        for r in comparison.models[1:]:
            got = _gate_value(r, key)
            if got is None:
                failures.append(f"{r.path}: {key} was not measured (gate {text!r})")
            elif _OPS[op](got, value):
                failures.append(f"{r.path}: {key} = {got:.4g} ({text})")
    if failures:
        raise GateFailed("gate failed: " + "; ".join(failures))
