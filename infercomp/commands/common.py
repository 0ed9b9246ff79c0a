"""Options shared by every subcommand, error mapping, progress on stderr, and result output."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar
from rich.table import Column

import infercomp.plot as plotting
import infercomp.render as render
from infercomp.checkpoint import TORCH_SUFFIXES, write_atomic
from infercomp.errors import InfercompError, OutputKept, UsageError
from infercomp.gates import check_gates, parse_gate
from infercomp.measure import Comparison
from infercomp.models import parse_config
from infercomp.progress import Progress, Task

# ---------------------------------------------------------------------------- shared option types
Output = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help="Where to write the new checkpoint: a .safetensors file, or for a Hugging Face directory input a directory "
        "(config.json, tokenizer files, sharded safetensors) unless the path ends in .safetensors.",
    ),
]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Overwrite OUTPUT if it exists (the input is never overwritten; a directory only when it holds a model and none of the run's inputs).",
    ),
]
Data = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Data file for accuracy/fidelity and calibration: .safetensors/.npz with 'inputs' and optional 'labels'; for a Hugging Face directory also text (.txt, one example a line; .jsonl with 'text').",
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model code: built-in name (digits-cnn), package.module:callable or path/file.py:callable. Trusted because you named it.",
    ),
]
ModelConfig = Annotated[
    str | None, typer.Option("--model-config", help="JSON object (or a file holding one) of keyword arguments for --model.")
]
TrustCode = Annotated[
    bool, typer.Option("--trust-model-code", help="Import the model code named inside the checkpoint even if it is not built in.")
]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
Threads = Annotated[int | None, typer.Option("--threads", help="Torch CPU threads for measuring (default: torch's default).", min=1)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Batch size for latency and evaluation.", min=1)]
MinTime = Annotated[float, typer.Option("--min-time", help="Seconds of timed runs per model, at least (after warm-up).", min=0.0)]
Warmup = Annotated[int, typer.Option("--warmup", help="Untimed warm-up runs per model.", min=0)]
NoLatency = Annotated[bool, typer.Option("--no-latency", help="Skip latency measurement.")]
Memory = Annotated[
    bool, typer.Option("--memory", help="Also measure peak resident memory of loading + one forward pass (one fresh process per model).")
]
Compute = Annotated[
    str,
    typer.Option(
        "--compute",
        help="How models run on the CPU: auto (measure the candidates the storage allows, keep the fastest; "
        "never slower than fp32), fp32, bf16 (weights decoded once to bf16) or int8 (int8 matmuls, activations quantized per token).",
    ),
]
Compile = Annotated[
    bool, typer.Option("--compile", help="Run the models under torch.compile (compiled during the warm-up runs; the report says so).")
]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Go on when a checkpoint holds NaN or infinite values (refused by default).")
]
Layers = Annotated[bool, typer.Option("--layers", help="Also show a per-layer view: storage, sparsity, SQNR against the baseline.")]
Plot = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Also draw the trade-off to FILE.png or FILE.svg: accuracy (or cosine) against size and latency; with --layers, "
        "per-layer SQNR and sparsity. Needs matplotlib (pip install 'infercomp[plot]').",
        dir_okay=False,
    ),
]
MaxShardSize = Annotated[
    str,
    typer.Option(
        "--max-shard-size", help="Hugging Face directory output (streamed or not): the largest safetensors shard (5GB, 500MB, 2GiB)."
    ),
]
Stream = Annotated[
    bool | None,
    typer.Option(
        "--stream/--no-stream",
        help="Weight-only transforms (magnitude / 2:4 pruning, rtn quantization; gptq, wanda and sparsegpt on a Hugging Face "
        "causal LM, one decoder block at a time): read, transform and write one tensor at a time, so memory stays bounded "
        "whatever the checkpoint's size; the report then holds static figures only. Default: stream inputs larger than 1 GiB.",
        show_default=False,
    ),
]
Export = Annotated[
    str | None,
    typer.Option(
        "--export",
        help="dense: write plain dense tensors (pruned, distilled or dequantized weights, no compression format) in the "
        "input's layout, for loaders that know none; a Hugging Face directory then carries no quantization_config.",
        show_default=False,
    ),
]
Columns = Annotated[
    str | None,
    typer.Option(
        "--columns",
        help="Table columns: 'all', or a comma-separated list (default: model, size, size x, latency ms (p50 / p90), "
        "latency x, accuracy, acc drop, cos mean / min).",
    ),
]
Format = Annotated[str, typer.Option("--format", "-f", help="Output on stdout: table, json, markdown or csv.")]
ReportOut = Annotated[
    Path | None,
    typer.Option("--report-out", help="Also save the comparison: .json, .md or .csv by extension (JSON otherwise).", dir_okay=False),
]
FailIf = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-if", help="Exit 1 when a condition holds for a compared model, e.g. 'accuracy_drop>0.01', 'latency_ratio>0.9'. Repeatable."
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
Include = Annotated[
    list[str] | None, typer.Option("--include", help="Glob on module names to transform (repeatable); default: all eligible.")
]
Exclude = Annotated[list[str] | None, typer.Option("--exclude", help="Glob on module names to leave alone (repeatable).")]


@dataclass(frozen=True)
class Common:
    """The shared options of one invocation, bundled."""

    model: str | None = None
    model_config: str | None = None
    trust_model_code: bool = False
    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 32
    min_time: float = 1.0
    warmup: int = 3
    no_latency: bool = False
    layers: bool = False
    fmt: str = "table"
    report_out: Path | None = None
    fail_if: tuple[str, ...] = ()
    quiet: bool = False
    memory: bool = False
    compute: str = "auto"
    allow_nonfinite: bool = False
    compile: bool = False
    columns: str | None = None
    plot: Path | None = None

    @classmethod
    def pick(cls, options: dict[str, Any]) -> Common:
        """The shared options out of a command's parameters (``Common.pick(locals())``); options a
        command does not offer keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in options.items() if k in names}
        kwargs["fail_if"] = tuple(kwargs.get("fail_if") or ())
        return cls(**kwargs)

    def __post_init__(self) -> None:
        if self.report_out is not None and self.report_out.suffix in (".safetensors", *TORCH_SUFFIXES):
            raise UsageError(f"--report-out {self.report_out}: looks like a checkpoint; give a .json, .md or .csv path")
        if self.plot is not None:
            plotting.check_path(self.plot)
        try:
            render.parse_columns(self.columns)
        except ValueError as e:
            raise UsageError(str(e)) from e
        if self.fmt not in render.FORMATS:
            raise UsageError(f"--format {self.fmt!r} is not supported; choose one of: {', '.join(render.FORMATS)}")
        for gate in self.fail_if:
            parse_gate(gate)

    def verb_options(self) -> dict[str, Any]:
        """The keyword options of an ``infercomp.api`` verb that these flags set."""
        return {
            "model": self.model,
            "model_config": parse_config(self.model_config),
            "trust_model_code": self.trust_model_code,
            "device": self.device,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "warmup": self.warmup,
            "min_time": self.min_time,
            "latency": not self.no_latency,
            "memory": self.memory,
            "layers": self.layers,
            "compute": self.compute,
            "compile": self.compile,
            "allow_nonfinite": self.allow_nonfinite,
        }

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        if self.quiet or not sys.stderr.isatty():
            yield StderrLog()
            return
        with RichProgress() as p:
            yield p


def stdout_console() -> Console:
    return Console(file=sys.stdout, soft_wrap=False, width=None if sys.stdout.isatty() else 1000)


def stderr_console() -> Console:
    return Console(file=sys.stderr, stderr=True)


class StderrLog(Progress):
    """No bars; warnings still reach stderr."""

    def log(self, message: str) -> None:
        print(f"infercomp: {message}", file=sys.stderr)


class _RichTask(Task):
    def __init__(self, bar: RichBar, task_id: Any):
        self.bar, self.id = bar, task_id

    def advance(self, n: float = 1, **fields: Any) -> None:
        self.bar.update(self.id, advance=n, info=_fields(fields))

    def update(self, **fields: Any) -> None:
        self.bar.update(self.id, info=_fields(fields))


def _fields(fields: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


class RichProgress(Progress):
    """Progress bars on stderr (rich); removed when each task ends."""

    def __init__(self) -> None:
        # The counts and times keep their width; the words (description, info) are cut with "…"
        # first: in 80 columns a long info line of one bar squeezed every bar's numbers to "…".
        def words(field: str, ratio: int) -> TextColumn:
            return TextColumn(field, table_column=Column(no_wrap=True, overflow="ellipsis", ratio=ratio, min_width=8))

        def figures(column: type[ProgressColumn]) -> ProgressColumn:
            return column(table_column=Column(no_wrap=True, min_width=7))

        self.bar = RichBar(
            SpinnerColumn(),
            words("{task.description}", 2),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6)),
            figures(MofNCompleteColumn),
            figures(TimeElapsedColumn),
            figures(TimeRemainingColumn),
            words("{task.fields[info]}", 3),
            console=stderr_console(),
            transient=True,
            expand=True,
        )

    def __enter__(self) -> RichProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        tid = self.bar.add_task(description, total=total, info="")
        try:
            yield _RichTask(self.bar, tid)
        finally:
            self.bar.remove_task(tid)

    def log(self, message: str) -> None:
        self.bar.console.print(f"infercomp: {message}", markup=False, highlight=False)


def run(common: Common, verb: Callable[..., Comparison | None], *args: Any, **options: Any) -> None:
    """The body every command shares: call the API ``verb`` with the shared options and progress
    on stderr, then print / save / gate the comparison it returns."""
    if common.report_out is not None:  # refused before any work: exit 2 leaves no output
        _refuse_report_over(common.report_out, [*args, *options.values()])
    with common.progress() as progress:
        result = verb(*args, progress=progress, **{**common.verb_options(), **options})
    if result is not None:  # None: a torchrun rank other than 0, which prints nothing
        emit(result, common)


def _refuse_report_over(report: Path, values: list[Any]) -> None:
    """--report-out naming one of the command's paths (input, output, data) is refused."""
    paths = [p for v in values for p in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(p, Path)]
    for p in paths:
        if p.resolve() == report.resolve() or (p.exists() and report.exists() and os.path.samefile(p, report)):
            raise UsageError(f"--report-out {report}: is also {p}, a path of this command; choose another path")


def emit(comparison: Comparison, common: Common) -> None:
    """Print the comparison on stdout in the chosen format, save --report-out, check --fail-if."""
    if common.fmt == "table":
        render.render_table(comparison, stdout_console(), render.parse_columns(common.columns))
    else:
        sys.stdout.write(render.render_text(comparison, common.fmt, render.parse_columns(common.columns) if common.columns else None))
        sys.stdout.flush()
    if common.report_out is not None:
        out = common.report_out
        if any(Path(m.path).exists() and os.path.samefile(out, m.path) for m in comparison.models if out.exists()):
            raise UsageError(f"--report-out {out}: is one of the compared checkpoints; choose another path")
        fmt = {".md": "markdown", ".csv": "csv"}.get(out.suffix, "json")
        text = render.render_text(comparison, fmt).encode()
        write_atomic(out, lambda f: f.write(text), what="the report")
    if common.plot is not None:
        plotting.plot(comparison, common.plot)
    check_gates(comparison, common.fail_if)


F = TypeVar("F", bound=Callable[..., Any])
INTERNAL_ERROR = 3


def _interrupt(signum: int, frame: Any) -> None:
    del signum, frame
    raise KeyboardInterrupt


def handle_errors(fn: F) -> F:
    """Map InfercompError to one line on stderr + its exit code (2, or 1 for a failed gate),
    Ctrl-C / SIGTERM to exit 130, any other exception (a bug) to one line and exit 3; full
    tracebacks only with --debug or INFERCOMP_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or os.environ.get("INFERCOMP_DEBUG") == "1"
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (CI timeouts, `kill`) takes the same clean path as Ctrl-C: temp files removed, exit 130.
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except InfercompError as e:
            if debug:
                traceback.print_exc()
            print(f"infercomp: error: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None
        except OutputKept as e:
            print(f"infercomp: interrupted while the output was measured; {e.path} was written completely and is kept", file=sys.stderr)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            print("infercomp: interrupted; no partial output was left behind", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as e:  # a bug of ours, not bad input: exit 3 so CI can tell it from 1 and 2
            if debug:
                traceback.print_exc()
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"infercomp: internal error: {type(e).__name__}: {detail[:300]} (rerun with --debug for the traceback)", file=sys.stderr)
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper  # type: ignore[return-value]
