"""Knowledge distillation (Hinton et al., 2015): train a student on a teacher's softened outputs.

``distill(teacher_ckpt, DistillConfig(...), ctx) -> student Checkpoint``. Modules: ``loss`` (KD,
output and feature losses), ``trainer`` (the loop: schedule, validation, interrupts, DDP),
``state`` (resumable training state in safetensors + JSON), ``ddp`` (torchrun environment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.config import TransformConfig, choice
from infercomp.data import Dataset, load_data
from infercomp.distill import ddp
from infercomp.distill.loss import FEATURE_LOSSES, OUTPUT_LOSSES, FeatureMatch, kd_loss, kd_loss_per_sample, parse_layer_pairs
from infercomp.distill.state import state_path
from infercomp.distill.trainer import Job, Trainable, train
from infercomp.errors import DataError, ModelError, UsageError
from infercomp.measure import first_output
from infercomp.models import ModelLoader
from infercomp.progress import NULL, Progress

if TYPE_CHECKING:
    from infercomp.pipeline import Context


@dataclass(frozen=True)
class DistillConfig(TransformConfig):
    """How to distill.

    Attributes:
        student: path of a student checkpoint (e.g. the output of ``infercomp prune``), or None.
        student_model / student_config: model code for a freshly initialised student, or None.
        temperature: T, softens both distributions; alpha: weight of the soft term (1 - alpha on CE).
        epochs, lr, batch_size, weight_decay, seed: AdamW with 5 % linear warm-up then cosine decay;
            ``batch_size`` is per rank under torchrun (global batch = batch_size * world size).
        val_data: held-out data scored after every epoch; the best student is kept.
        output_loss: ``kl`` (softened logits), or ``mse`` / ``cosine`` for embedding outputs.
        feature_loss: ``none`` or ``mse`` between matched hidden layers (``feature_layers``:
            ``NAME`` or ``STUDENT=TEACHER`` module names; default the inputs of each model's last
            Linear), through a learned projection where widths differ, weighted by ``feature_weight``.
        resume: continue from the saved training state next to the output (not recorded in the
            output: a resumed run writes the same bytes as an uninterrupted one).
    """

    transform: ClassVar[str] = "distill"
    student: str | None = None
    student_model: str | None = None
    student_config: dict[str, Any] = field(default_factory=dict)
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0
    val_data: str | None = None
    output_loss: str = "kl"
    feature_loss: str = "none"
    feature_layers: tuple[str, ...] = ()
    feature_weight: float = 1.0
    resume: bool = False

    def inputs(self) -> tuple[str, ...]:
        """The student checkpoint and validation data are read by the run: never overwritten by it."""
        return tuple(p for p in (self.student, self.val_data) if p is not None)

    def __post_init__(self) -> None:
        if (self.student is None) == (self.student_model is None):
            raise UsageError("give the student as exactly one of --student FILE or --student-model REF")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(f"--temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:  # also rejects NaN
            raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise UsageError(f"--feature-weight must be >= 0, got {self.feature_weight}")
        choice(self.output_loss, OUTPUT_LOSSES, "--output-loss")
        choice(self.feature_loss, FEATURE_LOSSES, "--feature-loss")
        if self.feature_layers and self.feature_loss == "none":
            raise UsageError("--feature-layers needs --feature-loss mse")

    def to_dict(self) -> dict[str, Any]:
        """As recorded in the output's history: everything that shapes the result (``resume``
        does not, so it is left out and a resumed run writes the same bytes)."""
        d = super().to_dict()
        d.pop("resume")
        return d


def _student(config: DistillConfig, loader: ModelLoader, teacher: Checkpoint) -> tuple[nn.Module, dict[str, Any], dict[str, Any] | None]:
    """The student module, the model reference to record for it, and its structured-pruning plan
    (carried into the output so the chain stays replayable)."""
    if config.student is not None:
        sc = checkpoint.load(config.student)
        if sc.model is None and loader.spec_for(sc) is None:  # a bare state dict: assume the teacher's architecture
            sc.model = loader.spec_for(teacher)
        return loader.build(sc, runtime=False), loader.spec_for(sc) or {}, sc.plan
    torch.manual_seed(config.seed)
    spec = {"ref": config.student_model, "config": dict(config.student_config)}
    return ModelLoader(ref=config.student_model, config=spec["config"]).build_fresh(), spec, None


def _sparsity_masks(student: nn.Module, min_zeros: float = 0.01) -> dict[str, torch.Tensor]:
    """Keep-masks for the student's weight matrices / filters that are at least ``min_zeros``
    exact zeros (unstructured pruning; trained dense weights are practically never exactly 0),
    keyed by their name in ``Trainable``."""
    masks = {}
    for name, p in student.named_parameters():
        if p.dim() >= 2 and p.is_floating_point():
            keep = p.detach() != 0
            if 1 - float(keep.float().mean()) >= min_zeros:
                masks[f"student.{name}"] = keep
    return masks


def _check_fit(teacher: nn.Module, student: nn.Module, data: Dataset, config: DistillConfig, teacher_name: str) -> None:
    """Fail early, naming the problem, when the student cannot learn from this teacher on this data."""
    probe = data.inputs[:2]
    with torch.no_grad():
        try:
            t_out = first_output(teacher(probe))
        except Exception as e:  # model code: report the shape problem, not a traceback
            raise DataError(f"{data.path}: the teacher cannot run on 'inputs' of shape {tuple(probe.shape[1:])}: {e}") from e
        try:
            s_out = first_output(student(probe))
        except Exception as e:
            raise ModelError(f"the student cannot run on {data.path} 'inputs' of shape {tuple(probe.shape[1:])}: {e}") from e
    if t_out.shape != s_out.shape:
        raise ModelError(
            f"student output shape {tuple(s_out.shape[1:])} differs from the teacher's {tuple(t_out.shape[1:])} ({teacher_name}); "
            "the student must produce the same outputs (e.g. the same number of classes) — check --student-config"
        )
    if config.output_loss == "kl" and t_out.dim() < 2:
        raise ModelError(f"--output-loss kl needs class scores of shape (N, C); the models return {tuple(t_out.shape)}")
    if data.labels is not None and config.alpha < 1 and t_out.dim() >= 2:
        top = int(data.labels.max())
        if top >= t_out.shape[-1]:
            raise DataError(f"{data.path}: 'labels' go up to {top} but the models output {t_out.shape[-1]} classes")


def distill(teacher_ckpt: Checkpoint, config: DistillConfig, ctx: Context) -> Checkpoint:
    """Train the student against the teacher on ``ctx.data``; return the student checkpoint.

    Under torchrun every rank calls this (see :func:`run_rank`); all ranks train, rank 0's result is
    the one written. The training state is kept next to ``ctx.output`` (see ``state.state_path``).
    """
    if ctx.data is None:
        raise DataError("distill needs --data with training 'inputs' (and optional 'labels')")
    data = ctx.data
    d, device, created = ddp.setup(ctx.device)
    progress: Progress = ctx.progress if d.main else NULL
    try:
        teacher = ctx.loader.build(teacher_ckpt, runtime=False)
        student, spec, plan = _student(config, ctx.loader, teacher_ckpt)
        _check_fit(teacher, student, data, config, teacher_ckpt.name)
        if config.alpha == 0 and data.labels is None:
            progress.log("--alpha 0 but the training data has no 'labels': every sample learns from the teacher alone")
        tokenizer = ctx.source if ctx.source is not None and ctx.source.is_dir() else None  # HF directory: its tokenizer
        val = load_data(config.val_data, tokenizer=tokenizer) if config.val_data is not None else None
        torch.manual_seed(config.seed)  # projections initialise the same way on every rank and every run
        features = None
        if config.feature_loss == "mse":
            pairs = parse_layer_pairs(config.feature_layers, student, teacher)
            features = FeatureMatch(student, teacher, pairs, data.inputs[:2])
        trainable = Trainable(student, features)
        masks = _sparsity_masks(student) if config.student is not None else {}
        if masks:
            kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            progress.log(f"the student's pruned weights stay zero: {len(masks)} tensor(s), {1 - kept:.1%} zeros")
        job = Job(
            data=data,
            val=val,
            device=device,
            state_file=None if ctx.output is None else state_path(Path(ctx.output)),
            resume=config.resume,
            fingerprint=config.to_dict(),
            progress=progress,
            masks=masks,
        )
        tensors, _summary = train(teacher, trainable, config, job, d)
        if features is not None:
            features.close()
    finally:
        ddp.teardown(created)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return Checkpoint(tensors=tensors, model=spec, plan=plan)


def run_rank(
    teacher: str | Path, output: str | Path, config: DistillConfig, *, loader: ModelLoader, data: str | Path, device: torch.device
) -> None:
    """What a rank other than 0 runs under torchrun: the same training, without writing or printing
    (rank 0 runs the whole pipeline: it alone saves the output and compares)."""
    from infercomp.pipeline import Context

    src = Path(teacher)
    tokenizer = src if src.is_dir() else None  # HF directory: text data uses its tokenizer, as on rank 0
    ctx = Context(loader=loader, data=load_data(data, tokenizer=tokenizer), device=device, progress=NULL, source=src, output=Path(output))
    distill(checkpoint.load(src), config, ctx)


__all__ = ["DistillConfig", "distill", "kd_loss", "kd_loss_per_sample", "run_rank", "state_path"]
