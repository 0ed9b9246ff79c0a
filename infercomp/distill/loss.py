"""Distillation losses: the soft-target term on the outputs (KL, MSE or cosine), cross-entropy on
labels where they exist, and hidden-feature matching with learned projections.

Every loss here is computed *per sample* (shape (N,)) so the trainer can divide the sum by the
global batch size: that keeps a DistributedDataParallel run equal to a single-process one even
when the last batch does not split evenly across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infercomp.errors import ModelError, UsageError

OUTPUT_LOSSES = ("kl", "mse", "cosine")
FEATURE_LOSSES = ("none", "mse")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 autocast outputs are widened; float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float, kind: str = "kl") -> torch.Tensor:
    """Per-sample distance between student and teacher outputs, shape (N,).

    ``kl``: T^2 * KL(softmax(t/T) || softmax(s/T)) over the last dim (Hinton et al.; the T^2 keeps the
    gradient scale independent of T). ``mse``: mean squared difference. ``cosine``: 1 - cosine
    similarity (for embedding models without logits).
    """
    if kind == "kl":
        t = temperature
        log_s = F.log_softmax(_wide(student) / t, dim=-1)
        log_t = F.log_softmax(_wide(teacher) / t, dim=-1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (N, ...) -> summed over classes
        return kl.flatten(1).mean(1) * t * t if kl.dim() > 1 else kl * t * t
    s, t_ = _wide(student).flatten(1), _wide(teacher).flatten(1)
    if kind == "mse":
        return (s - t_).pow(2).mean(1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(s, t_, dim=1, eps=1e-8)
    raise UsageError(f"--output-loss {kind!r} is not supported; choose one of: {', '.join(OUTPUT_LOSSES)}")


def kd_loss_per_sample(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    kind: str = "kl",
) -> torch.Tensor:
    """Per-sample ``alpha * soft + (1 - alpha) * CE(s, y)``, shape (N,).

    A sample without a label (``labels`` None, or a negative label) learns from the teacher alone:
    its loss is the soft term at full weight. ``teacher`` may be None only when ``alpha == 0`` and
    every sample is labeled (plain fine-tuning: the teacher is never run).
    """
    if teacher is None:
        if alpha != 0 or labels is None or bool((labels < 0).any()):
            raise UsageError("the teacher's outputs are needed unless --alpha is 0 and every sample has a label")
        return F.cross_entropy(_wide(student), labels, reduction="none")
    soft = soft_loss(student, teacher, temperature=temperature, kind=kind)
    if labels is None:
        return soft
    labeled = labels >= 0
    ce = F.cross_entropy(_wide(student), labels.clamp(min=0), reduction="none")
    return torch.where(labeled, alpha * soft + (1 - alpha) * ce, soft)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, *, temperature: float, alpha: float, kind: str = "kl"
) -> torch.Tensor:
    """Batch mean of :func:`kd_loss_per_sample`:
    ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; CE only with labels
    (without labels the soft term carries the whole weight)."""
    return kd_loss_per_sample(student, teacher, labels, temperature=temperature, alpha=alpha, kind=kind).mean()


# ----------------------------------------------------------------------------------- feature loss


def _last_linear(model: nn.Module, which: str) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"--feature-loss: the {which} has no nn.Linear layer to take features from; name layers with --feature-layers")
    return names[-1]


def parse_layer_pairs(spec: tuple[str, ...], student: nn.Module, teacher: nn.Module) -> list[tuple[str, str, bool]]:
    """``--feature-layers`` entries (``NAME`` or ``STUDENT_NAME=TEACHER_NAME``) -> (student module,
    teacher module, take_input). Empty: the inputs of the last Linear layer of each model (the
    penultimate representation)."""
    if not spec:
        return [(_last_linear(student, "student"), _last_linear(teacher, "teacher"), True)]
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    pairs = []
    for item in spec:
        s_name, _, t_name = item.partition("=")
        t_name = t_name or s_name
        for name, mods, which in ((s_name, s_mods, "student"), (t_name, t_mods, "teacher")):
            if not name or name not in mods:
                some = ", ".join(n for n in list(mods)[1:8] if n)
                raise UsageError(f"--feature-layers {item!r}: the {which} has no module {name!r} (modules include: {some}, ...)")
        pairs.append((s_name, t_name, False))
    return pairs


class _Capture:
    """Forward (pre-)hook that keeps the last tensor a module saw or produced."""

    def __init__(self, module: nn.Module, take_input: bool):
        self.value: torch.Tensor | None = None
        if take_input:
            self.handle = module.register_forward_pre_hook(self._pre)
        else:
            self.handle = module.register_forward_hook(self._post)

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def _post(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.value = out[0] if isinstance(out, (tuple, list)) else out


def _projection(s: torch.Tensor, t: torch.Tensor, where: str) -> nn.Module:
    """Identity when shapes agree; else a learned map on the channel dim: a 1x1 conv for (N, C, H, W)
    maps, a Linear on the last dim for (N, C) or (N, T, C)."""
    if s.shape[1:] == t.shape[1:]:
        return nn.Identity()
    if s.dim() == 4 and t.dim() == 4 and s.shape[2:] == t.shape[2:]:
        return nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
    if s.dim() in (2, 3) and s.dim() == t.dim() and s.shape[1:-1] == t.shape[1:-1]:
        return nn.Linear(s.shape[-1], t.shape[-1], bias=False)
    raise ModelError(
        f"--feature-layers {where}: student features {tuple(s.shape[1:])} and teacher features {tuple(t.shape[1:])} "
        "differ in more than the channel width; pick layers whose outputs have the same spatial/sequence shape"
    )


class FeatureMatch(nn.Module):
    """Hooks on matched student/teacher layers plus the learned projections (student -> teacher
    width) between them. The projections train with the student and are not part of the output."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str, bool]], probe: torch.Tensor):
        super().__init__()
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self.names = [f"{s}={t}" if s != t else s for s, t, _ in pairs]
        self._s = [_Capture(s_mods[s], inp) for s, _, inp in pairs]
        self._t = [_Capture(t_mods[t], inp) for _, t, inp in pairs]
        with torch.no_grad():
            was = student.training
            student.eval()
            student(probe)
            teacher(probe)
            student.train(was)
        self.proj = nn.ModuleList(_projection(cs.value, ct.value, name) for cs, ct, name in zip(self._s, self._t, self.names))

    def loss_per_sample(self) -> torch.Tensor:
        """Mean squared error of each projected student feature against the teacher's, averaged
        over the matched layers: shape (N,). Call after both forward passes."""
        terms = []
        for cs, ct, proj in zip(self._s, self._t, self.proj):
            s, t = proj(cs.value.float()), ct.value.detach().float()
            terms.append((s - t).pow(2).flatten(1).mean(1))
        return torch.stack(terms).mean(0)

    def close(self) -> None:
        for c in (*self._s, *self._t):
            c.handle.remove()
