"""``infercomp quantize``: store and run weights in fewer bits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import infercomp.api as api
import infercomp.commands.common as c
from infercomp.quantize import GROUP_SIZES, METHODS, SCHEMES


@c.handle_errors
def quantize(
    source: Annotated[Path, typer.Argument(help="Checkpoint to quantize.", show_default=False)],
    output: c.Output,
    scheme: Annotated[str, typer.Option("--scheme", help=f"One of: {', '.join(SCHEMES)} (see above).")] = "int8",
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size",
            help=f"int8/int4: columns sharing one scale ({'|'.join(map(str, GROUP_SIZES))}), or -1 for one scale per output channel. Default: per channel for int8, 32 for int4.",
        ),
    ] = None,
    asymmetric: Annotated[
        bool, typer.Option("--asymmetric", help="int4: a zero point per group (range 0..15) instead of symmetric -8..7.")
    ] = False,
    method: Annotated[
        str, typer.Option("--method", help=f"One of: {', '.join(METHODS)}. gptq compensates rounding error using --data (int8/int4).")
    ] = "rtn",
    calib_samples: Annotated[
        int, typer.Option("--calib-samples", help="gptq: how many --data inputs to calibrate on (the first N).")
    ] = 128,
    column_scales: Annotated[
        bool | None,
        typer.Option(
            "--column-scales/--no-column-scales",
            help="int8/int4 rtn: a scale per input column too, one byte each (default: on each tensor where it "
            "lowers the rounding error); --no-column-scales keeps the plain compressed-tensors layout.",
            show_default=False,
        ),
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Evaluate on this data file instead of --data (keep calibration and test apart).")
    ] = None,
    include: c.Include = None,
    exclude: c.Exclude = None,
    force: c.Force = False,
    max_shard_size: c.MaxShardSize = "5GB",
    export: c.Export = None,
    stream: c.Stream = None,
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
    """Quantize weights, write the compact checkpoint, and compare it with the input.

    Weight matrices, conv filters and embedding tables of the selected modules are quantized
    (for a Hugging Face directory output, Linear layers only: what compressed-tensors' loaders
    read); biases and norms keep their dtype. Schemes:

    \b
    int8          int8 weights, a scale per output channel (or per --group-size
                  columns); ~0.26x size.
    int8-dynamic  int8 weights per channel, and activations quantized to 8 bits
                  at run time: Linear layers run on int8 CPU kernels (the fast
                  choice on CPU).
    int4          4-bit weights, two per byte, a scale per group of 32
                  (--group-size; -1: per channel), symmetric or --asymmetric;
                  ~0.15x size. Use --method gptq --data FILE to keep accuracy.
    fp8           float8 e4m3 weights with per-channel scales; fp8 matmuls on
                  CUDA GPUs >= sm89, dequantized elsewhere.
    fp16, bf16    every float tensor cast to 16 bits.

    Stored as plain integer tensors + scales (compressed-tensors names: weight_packed,
    weight_scale, weight_zero_point, plus weight_column_scale where column scales are used);
    infercomp.load() runs them quantized.
    """
    opts = c.Common.pick(locals())
    c.run(
        opts,
        api.quantize,
        source,
        output,
        scheme=scheme,
        group_size=group_size,
        asymmetric=asymmetric,
        method=method,
        calib_samples=calib_samples,
        column_scales=column_scales,
        include=include or (),
        exclude=exclude or (),
        data=data,
        eval_data=eval_data,
        force=force,
        max_shard_size=max_shard_size,
        export=export,
        stream=stream,
    )
