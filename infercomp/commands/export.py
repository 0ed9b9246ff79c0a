"""``infercomp export``: plain dense tensors, for loaders that know no compression format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import infercomp.api as api
import infercomp.commands.common as c
from infercomp.export import DTYPES


@c.handle_errors
def export(
    source: Annotated[Path, typer.Argument(help="Checkpoint to export (any infercomp output, or any checkpoint).", show_default=False)],
    output: c.Output,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help=f"Cast every float tensor to one of: {', '.join(DTYPES)}. Default: each tensor's own dtype."),
    ] = None,
    force: c.Force = False,
    max_shard_size: c.MaxShardSize = "5GB",
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
    """Write a checkpoint as plain dense tensors in its own layout, and compare the two.

    Sparse and quantized weights (bitmask, int8, int4, fp8, pack-quantized) are decoded; pruned
    layers keep their smaller shapes. A Hugging Face directory gives a Hugging Face directory with
    no quantization_config, which transformers.from_pretrained loads like any dense model.
    """
    opts = c.Common.pick(locals())
    c.run(opts, api.export, source, output, dtype=dtype, data=data, force=force, max_shard_size=max_shard_size)
