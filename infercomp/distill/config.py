"""``DistillConfig``: how to distill, validated, recorded in the output's history."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import infercomp.checkpoint as checkpoint
import infercomp.hf as hf
from infercomp.distill.loss import FEATURE_LOSSES, OUTPUT_LOSSES
from infercomp.errors import InfercompError, UsageError
from infercomp.transform import TransformConfig, choice


@dataclass(frozen=True)
class DistillConfig(TransformConfig):
    """How to distill.

    Attributes:
        student: path of a student checkpoint (e.g. the output of ``infercomp prune``), or None.
        student_model / student_config: model code for a freshly initialised student, or None.
        temperature: T, softens both distributions; alpha: weight of the soft term (1 - alpha on CE).
        epochs, lr, batch_size, weight_decay, seed: AdamW with 5 % linear warm-up then cosine decay;
            ``batch_size`` is per rank under torchrun (global batch = batch_size * world size).
            ``lr`` None picks ``default_lr`` (recorded resolved).
        val_data: held-out data scored after every epoch; the best student is kept.
        output_loss: ``kl`` (softened logits), or ``mse`` / ``cosine`` for embedding outputs.
        feature_loss: ``none`` or ``mse`` between matched hidden layers (``feature_layers``:
            ``NAME`` or ``STUDENT=TEACHER`` module names; default the inputs of each model's last
            Linear), through a learned projection where widths differ, weighted by ``feature_weight``.
        resume: continue from the saved training state next to the output (not recorded in the
            output: a resumed run writes the same bytes as an uninterrupted one).
    """

    transform: ClassVar[str] = "distill"
    threads: ClassVar[int | None] = None  # training on one thread would cost too much; see docs/distill.md
    student: str | None = None
    student_model: str | None = None
    student_config: dict[str, Any] = field(default_factory=dict)
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 10
    lr: float | None = None
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
        if self.lr is None:  # frozen dataclass: resolve the default once, so it is recorded
            object.__setattr__(self, "lr", default_lr(self.student))
        assert self.lr is not None
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


# Default peak learning rates: a student trained from the start, or a pruned small model, learns
# well at SCRATCH_LR (the digits students of docs/distill.md); a pretrained Hugging Face
# transformer is fine-tuned, and SCRATCH_LR wrecks it (all-MiniLM-L6-v2's channel-pruned student,
# docs/hf.md), so it gets FINE_TUNE_LR, transformers' own Trainer default.
SCRATCH_LR = 3e-3
FINE_TUNE_LR = 5e-5


def default_lr(student: str | None) -> float:
    """``FINE_TUNE_LR`` when the student checkpoint holds a Hugging Face model (its stored model
    reference, read from the header), else ``SCRATCH_LR``. A student that cannot be read gets
    ``SCRATCH_LR`` here; loading it later says what is wrong."""
    if student is None:
        return SCRATCH_LR
    try:
        spec = checkpoint.load(student, lazy=True).model or {}
    except (InfercompError, OSError):  # reported by the real load, with the file named
        return SCRATCH_LR
    return FINE_TUNE_LR if spec.get("ref") == hf.HF_REF else SCRATCH_LR
