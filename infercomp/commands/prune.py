"""``infercomp prune``: remove weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infercomp.commands import common as c
from infercomp.pipeline import run
from infercomp.prune import METHODS, PruneConfig


@c.handle_errors
def prune(
    source: Annotated[Path, typer.Argument(help="Checkpoint to prune.", show_default=False)],
    output: c.Output,
    method: Annotated[str, typer.Option("--method", help=f"One of: {', '.join(METHODS)}.")] = "magnitude",
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of weights to remove, 0 <= s < 1.")] = 0.5,
    scope: Annotated[
        str, typer.Option("--scope", help="layer: every tensor reaches --sparsity; global: one threshold over all.")
    ] = "layer",
    include: c.Include = None,
    exclude: c.Exclude = None,
    force: c.Force = False,
    data: c.Data = None,
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
    fmt: c.Format = "table",
    report_out: c.ReportOut = None,
    fail_if: c.FailIf = None,
    quiet: c.Quiet = False,
    debug: c.Debug = False,
) -> None:
    """Remove weights, write the pruned checkpoint, and compare it with the input.

    magnitude: unstructured, the smallest |w| of each weight matrix (or globally) are zeroed.
    """
    opts = c.Common(
        model,
        model_config,
        trust_model_code,
        device,
        threads,
        batch_size,
        min_time,
        warmup,
        no_latency,
        layers,
        fmt,
        report_out,
        tuple(fail_if or ()),
        quiet,
    )
    config = PruneConfig(method=method, sparsity=sparsity, scope=scope, include=tuple(include or ()), exclude=tuple(exclude or ()))
    with opts.progress() as progress:
        result = run(source, output, config, loader=opts.loader(), options=opts.options(), data=data, force=force, progress=progress)
    c.emit(result, opts)
