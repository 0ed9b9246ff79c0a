"""Figures computed from tensors alone: accuracy, fidelity against a reference, SQNR.

Pure functions, no models and no I/O, so transforms (distill's validation) and measurements share
them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Top-1 accuracy over the labelled samples (a negative label means "unlabelled"); None if none are."""
    known = labels >= 0
    if not bool(known.any()):
        return None
    return float((logits[known].argmax(dim=-1) == labels[known]).float().mean())


def fidelity(outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Agreement of ``outputs`` with the baseline's: top-1 agreement, output cosine (mean, min),
    and KL(reference || outputs) of the softmax distributions (mean over samples)."""
    a, b = outputs.flatten(1), reference.flatten(1)
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-12)
    kl = F.kl_div(F.log_softmax(outputs, dim=-1), F.log_softmax(reference, dim=-1), log_target=True, reduction="none").sum(-1)
    return {
        "top1_agreement": float((outputs.argmax(-1) == reference.argmax(-1)).float().mean()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "kl_div": float(kl.flatten(0, -1).mean()) if kl.numel() else 0.0,
    }


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB; None when identical (infinite)."""
    noise = (reference - approx).pow(2).sum()
    if float(noise) == 0.0:
        return None
    return float(10 * torch.log10(reference.pow(2).sum() / noise))
