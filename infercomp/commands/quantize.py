"""``infercomp quantize``: store and run weights in fewer bits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infercomp.commands import common as c
from infercomp.pipeline import run
from infercomp.quantize import SCHEMES, QuantizeConfig


@c.handle_errors
def quantize(
    source: Annotated[Path, typer.Argument(help="Checkpoint to quantize.", show_default=False)],
    output: c.Output,
    scheme: Annotated[str, typer.Option("--scheme", help=f"One of: {', '.join(SCHEMES)}.")] = "int8",
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
    """Quantize weights, write the compact checkpoint, and compare it with the input.

    int8: symmetric per-output-channel int8 weights with float scales; Linear layers run on torch's
    int8 weight-only CPU kernel when loaded.
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
    config = QuantizeConfig(scheme=scheme, include=tuple(include or ()), exclude=tuple(exclude or ()))
    with opts.progress() as progress:
        result = run(source, output, config, loader=opts.loader(), options=opts.options(), data=data, force=force, progress=progress)
    c.emit(result, opts)
