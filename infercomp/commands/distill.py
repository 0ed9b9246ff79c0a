"""``infercomp distill``: train a small student from a teacher's softened outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import infercomp.api as api
import infercomp.commands.common as c
from infercomp.models import parse_config


@c.handle_errors
def distill(
    teacher: Annotated[Path, typer.Argument(help="Teacher checkpoint.", show_default=False)],
    output: c.Output,
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="Training data (.safetensors/.npz: 'inputs', optional 'labels'; text .txt/.jsonl for a Hugging Face model)."
        ),
    ],
    val_data: Annotated[
        Path | None,
        typer.Option(
            "--val-data", help="Held-out data: scored after every epoch (the best student is kept) and used for the final comparison."
        ),
    ] = None,
    student: Annotated[
        Path | None,
        typer.Option("--student", help="Student checkpoint to train (e.g. the output of infercomp prune; pruned zeros stay zero)."),
    ] = None,
    student_model: Annotated[
        str | None, typer.Option("--student-model", help="Model code for a fresh student (built-in name or module:callable).")
    ] = None,
    student_config: Annotated[str | None, typer.Option("--student-config", help="JSON keyword arguments for --student-model.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Softening temperature T (> 0).")] = 4.0,
    alpha: Annotated[
        float,
        typer.Option("--alpha", help="Weight of the distillation term; 1 - alpha goes to cross-entropy on labels (0 = plain fine-tuning)."),
    ] = 0.9,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over --data.", min=1)] = 10,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Peak learning rate (AdamW, 5% linear warm-up then cosine). Default: 5e-5 when the student is a "
            "Hugging Face model (fine-tuning a pretrained transformer), else 3e-3.",
            show_default=False,
        ),
    ] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW's decoupled weight decay.")] = 1e-4,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds initialisation and data order: the same seed gives the same bytes on CPU.")
    ] = 0,
    output_loss: Annotated[
        str, typer.Option("--output-loss", help="kl (softened class scores), or mse / cosine for embedding models without logits.")
    ] = "kl",
    feature_loss: Annotated[
        str, typer.Option("--feature-loss", help="none, or mse between matched hidden layers (learned projection where widths differ).")
    ] = "none",
    feature_layers: Annotated[
        list[str] | None,
        typer.Option(
            "--feature-layers", help="Module NAME or STUDENT=TEACHER names to match (repeatable); default: input of each last Linear."
        ),
    ] = None,
    feature_weight: Annotated[float, typer.Option("--feature-weight", help="Weight of the feature loss.")] = 1.0,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the state an interrupted run saved next to OUTPUT (OUT.train-state.safetensors)."),
    ] = False,
    force: c.Force = False,
    max_shard_size: c.MaxShardSize = "5GB",
    export: c.Export = None,
    model: c.Model = None,
    model_config: c.ModelConfig = None,
    trust_model_code: c.TrustCode = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (training uses bf16 autocast on cuda).")] = "cpu",
    threads: c.Threads = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch per process (and evaluation batch).", min=1)] = 64,
    min_time: c.MinTime = 1.0,
    warmup: c.Warmup = 3,
    no_latency: c.NoLatency = False,
    compute: c.Compute = "auto",
    compile: c.Compile = False,
    allow_nonfinite: c.AllowNonfinite = False,
    fmt: c.Format = "table",
    columns: c.Columns = None,
    plot: c.Plot = None,
    report_out: c.ReportOut = None,
    fail_if: c.FailIf = None,
    quiet: c.Quiet = False,
    debug: c.Debug = False,
) -> None:
    """Knowledge distillation: train the student on the teacher's softened outputs (Hinton et al.)
    and labels, write it, and compare teacher and student.

    Loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y); CE only where
    labels exist. Ctrl-C or SIGTERM saves a resumable state (exit 130); --resume continues it.
    Under `torchrun --nproc-per-node N -m infercomp distill ...` it trains with
    DistributedDataParallel (gloo on CPU, NCCL on GPU); rank 0 alone writes and prints.
    """
    opts = c.Common.pick(locals())
    c.run(
        opts,
        api.distill,
        teacher,
        output,
        data=data,
        student=student,
        student_model=student_model,
        student_config=parse_config(student_config),
        temperature=temperature,
        alpha=alpha,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        val_data=val_data,
        output_loss=output_loss,
        feature_loss=feature_loss,
        feature_layers=feature_layers or (),
        feature_weight=feature_weight,
        resume=resume,
        force=force,
        max_shard_size=max_shard_size,
        export=export,
    )
