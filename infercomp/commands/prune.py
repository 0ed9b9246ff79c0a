"""``infercomp prune``: remove weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import infercomp.api as api
import infercomp.commands.common as c
from infercomp.prune import METHODS
from infercomp.prune.structured import IMPORTANCES


@c.handle_errors
def prune(
    source: Annotated[Path, typer.Argument(help="Checkpoint to prune.", show_default=False)],
    output: c.Output,
    method: Annotated[str, typer.Option("--method", help=f"One of: {', '.join(METHODS)} (see above).")] = "magnitude",
    sparsity: Annotated[
        float, typer.Option("--sparsity", help="Fraction to remove, 0 <= s < 1: of the weights, or of each layer's channels (channel).")
    ] = 0.5,
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope",
            help="layer: every tensor reaches --sparsity; global: one threshold over all (magnitude only); "
            "channel: ffn (FFN channels), heads (attention heads) or all (both; a transformer's hidden size never "
            "changes). Default: global for magnitude, all for channel, layer otherwise.",
            show_default=False,
        ),
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="N:M: keep N of every M consecutive inputs (2:4 default: 2).", min=1)] = None,
    m: Annotated[
        int | None, typer.Option("--m", help="N:M: group size M (2:4 default: 4); with wanda or sparsegpt, makes it N:M.", min=2)
    ] = None,
    importance: Annotated[
        str, typer.Option("--importance", help=f"channel score: {', '.join(IMPORTANCES)} (activation needs --data).")
    ] = "l1",
    bias_correction: Annotated[
        bool,
        typer.Option(
            "--bias-correction",
            help="wanda: add to each pruned layer's bias what its removed weights added on average over --data "
            "(layers without a bias stay as they are).",
        ),
    ] = False,
    refine: Annotated[
        bool | None,
        typer.Option(
            "--refine/--no-refine",
            help="wanda: after wanda's masks, swap pruned and kept weights within each row while that lowers the "
            "layer's output error on --data (the weights are not changed). On by default; --no-refine gives the "
            "Wanda paper's masks.",
            show_default=False,
        ),
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Evaluate on this file instead of --data (keep calibration and test apart).")
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
    """Remove weights, write the pruned checkpoint, and compare it with the input.

    \b
    Methods (--method):
      magnitude  unstructured: zero the smallest |w| of all weights together (one
                 threshold; --scope layer: of each weight tensor alone, each
                 reaching --sparsity).
      channel    structured: remove whole output channels / conv filters /
                 attention heads / FFN channels and everything that depends on
                 them (next layer inputs, BatchNorm, residual-coupled layers);
                 tensors shrink, the model runs faster. Ranked by L1 row norm,
                 --importance l2, or activation (with --data). Output sizes never
                 change; a transformer keeps its hidden size (--scope ffn, heads,
                 or all of both).
      2:4        semi-structured N:M (--n 2 --m 4): in every 4 consecutive inputs
                 keep the 2 largest |w|; runs torch's sparse kernels on CUDA,
                 dense on CPU.
      wanda      |w| x ||input activation|| from --data calibration: per output
                 row, or N:M with --n/--m; then each row's mask is refined by
                 swaps that lower the layer's output error (--no-refine: the
                 paper's masks); --bias-correction also moves each bias by the
                 removed weights' mean contribution.
      sparsegpt  the same masks, chosen with each layer's inverse Hessian from
                 --data, and the kept weights updated to make up for the removed
                 ones (slower).

    Zeroed weights are stored as a bitmask plus the non-zero values when that is smaller.
    """
    opts = c.Common.pick(locals())
    c.run(
        opts,
        api.prune,
        source,
        output,
        method=method,
        sparsity=sparsity,
        scope=scope,
        n=n,
        m=m,
        importance=importance,
        bias_correction=bias_correction,
        refine=refine,
        include=include or (),
        exclude=exclude or (),
        data=data,
        eval_data=eval_data,
        force=force,
        max_shard_size=max_shard_size,
        export=export,
        stream=stream,
    )
