"""``infercomp report A [B ...]``: measure checkpoints side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import infercomp.api as api
import infercomp.commands.common as c


@c.handle_errors
def report(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints to compare; the first is the baseline.", show_default=False)],
    data: c.Data = None,
    sensitivity: Annotated[
        str | None,
        typer.Option(
            "--sensitivity",
            help="Compress one layer at a time (quantize:int4, quantize:int8, prune:magnitude:0.5, prune:channel:0.3), "
            "rank the layers by the drop each causes on --data, and suggest an --exclude list within --max-drop.",
        ),
    ] = None,
    max_drop: Annotated[
        float, typer.Option("--max-drop", help="With --sensitivity: the accuracy (or top-1 agreement) drop allowed, a fraction.")
    ] = 0.005,
    model: c.Model = None,
    model_config: c.ModelConfig = None,
    trust_model_code: c.TrustCode = False,
    device: c.Device = "cpu",
    threads: c.Threads = None,
    batch_size: c.BatchSize = 32,
    min_time: c.MinTime = 1.0,
    warmup: c.Warmup = 3,
    no_latency: c.NoLatency = False,
    layers: c.Layers = False,
    compute: c.Compute = "auto",
    compile: c.Compile = False,
    allow_nonfinite: c.AllowNonfinite = False,
    memory: c.Memory = False,
    fmt: c.Format = "table",
    columns: c.Columns = None,
    plot: c.Plot = None,
    report_out: c.ReportOut = None,
    fail_if: c.FailIf = None,
    quiet: c.Quiet = False,
    debug: c.Debug = False,
) -> None:
    """Size, parameters, sparsity, bits per weight, latency and accuracy of checkpoints, side by side.

    With a model available (built-in, stored in the checkpoint, or --model) latency is measured
    (median and p90 after warm-up, models interleaved in one process); with --data, accuracy
    (labels) or fidelity against the first checkpoint (top-1 agreement, output cosine).
    """
    opts = c.Common.pick(locals())
    c.run(opts, api.report, checkpoints, data=data, sensitivity=sensitivity, max_drop=max_drop)
