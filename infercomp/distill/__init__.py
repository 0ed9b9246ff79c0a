"""Knowledge distillation (Hinton et al., 2015): train a student on a teacher's softened outputs.
``distill(teacher_ckpt, DistillConfig(...), ctx) -> student Checkpoint``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.config import TransformConfig
from infercomp.errors import DataError, ModelError, UsageError
from infercomp.models import ModelLoader

if TYPE_CHECKING:
    from infercomp.pipeline import Context


@dataclass(frozen=True)
class DistillConfig(TransformConfig):
    """How to distill.

    Attributes:
        student: path of a student checkpoint (e.g. the output of ``infercomp prune``), or None.
        student_model / student_config: model code for a freshly initialised student, or None.
        temperature: T, softens both distributions; alpha: weight of the KD term (1 - alpha on CE).
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

    def __post_init__(self) -> None:
        if (self.student is None) == (self.student_model is None):
            raise UsageError("give the student as exactly one of --student FILE or --student-model REF")
        if self.temperature <= 0:
            raise UsageError(f"--temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UsageError("--epochs and --batch-size must be >= 1 and --lr > 0")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, *, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y); CE only with labels
    (without labels the KD term carries the whole weight)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True, reduction="batchmean")
    if labels is None:
        return kl * t * t
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)


def _student(config: DistillConfig, ctx: Context, teacher: Checkpoint) -> tuple[nn.Module, dict[str, Any]]:
    """The student module and the model reference to record for it."""
    if config.student is not None:
        sc = checkpoint.load(config.student)
        if sc.model is None:  # a bare state dict: assume the teacher's architecture (shape-adapted)
            sc.model = ctx.loader.spec_for(teacher)
        return ctx.loader.build(sc, runtime=False), ctx.loader.spec_for(sc) or {}
    torch.manual_seed(config.seed)
    spec = {"ref": config.student_model, "config": dict(config.student_config)}
    return ModelLoader(ref=config.student_model, config=spec["config"]).build_fresh(), spec


def distill(teacher_ckpt: Checkpoint, config: DistillConfig, ctx: Context) -> Checkpoint:
    """Train the student against the teacher on ``ctx.data``; return the student checkpoint."""
    if ctx.data is None:
        raise DataError("distill needs --data with training 'inputs' (and optional 'labels')")
    data = ctx.data
    teacher = ctx.loader.build(teacher_ckpt, runtime=False)
    student, spec = _student(config, ctx, teacher_ckpt)
    with torch.no_grad():
        probe = data.inputs[:2]
        t_out, s_out = teacher(probe), student(probe)
    if t_out.shape != s_out.shape:
        raise ModelError(f"student output shape {tuple(s_out.shape[1:])} differs from the teacher's {tuple(t_out.shape[1:])}")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(data)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    with ctx.progress.task("distilling", total=total) as task:
        for _epoch in range(config.epochs):
            student.train()
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, config.batch_size):
                idx = perm[i : i + config.batch_size]
                x = data.inputs[idx]
                y = None if data.labels is None else data.labels[idx]
                with torch.no_grad():
                    t = teacher(x)
                loss = kd_loss(student(x), t, y, temperature=config.temperature, alpha=config.alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                task.advance(loss=float(loss))
    student.eval()
    tensors = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    return Checkpoint(tensors=tensors, model=spec)


__all__ = ["DistillConfig", "distill", "kd_loss"]
