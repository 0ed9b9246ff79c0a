"""Figures computed from tensors alone: accuracy, fidelity against a reference, SQNR, next-token
loss (perplexity), sentence-embedding pooling.

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


def fidelity(outputs: torch.Tensor, reference: torch.Tensor, *, kind: str = "classifier") -> dict[str, float | None]:
    """Agreement of ``outputs`` with the baseline's: top-1 agreement, output cosine (mean, min),
    and KL(reference || outputs) of the softmax distributions (mean over samples).

    ``kind`` says what the outputs are, so that only figures with a meaning are given (the others
    are None): ``classifier`` (class scores: all four), ``distribution`` (next-token logits, one
    sample a token: no top-1, which is not a class prediction) or ``embedding`` (pooled sentence
    embeddings: cosine only, since a softmax over embedding dimensions means nothing).
    """
    a, b = outputs.flatten(1), reference.flatten(1)
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-12)
    out: dict[str, float | None] = {
        "top1_agreement": None,
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "kl_div": None,
    }
    if kind == "classifier":
        out["top1_agreement"] = float((outputs.argmax(-1) == reference.argmax(-1)).float().mean())
    if kind in ("classifier", "distribution"):
        kl = F.kl_div(F.log_softmax(outputs, dim=-1), F.log_softmax(reference, dim=-1), log_target=True, reduction="none").sum(-1)
        out["kl_div"] = float(kl.flatten(0, -1).mean()) if kl.numel() else 0.0
    return out


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of a causal LM predicting each
    next token: ``logits`` (N, T, V) at position t score ``ids`` (N, T) at t + 1. Targets where
    ``mask`` (N, T) is 0 (padding) are not scored. Perplexity is ``exp(sum / tokens)``."""
    target = ids[:, 1:]
    keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    if not bool(keep.any()):
        return 0.0, 0
    scores = logits[:, :-1][keep].float()  # (tokens, V)
    return float(F.cross_entropy(scores, target[keep], reduction="sum")), int(keep.sum())


# Sentence-transformers' pooling modes (``1_Pooling/config.json``), in the order it concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, modes: tuple[str, ...], *, normalize: bool = False) -> torch.Tensor:
    """Sentence embeddings (N, len(modes) * C) from token states ``hidden`` (N, T, C) as
    sentence-transformers' ``Pooling`` (padded inputs, no prompt) and ``Normalize`` compute them;
    ``mask`` (N, T) marks the real tokens (None: all are)."""
    m = torch.ones(hidden.shape[:2], dtype=torch.long) if mask is None else mask.long()
    h = hidden.float()
    mf = m.unsqueeze(-1).float()  # (N, T, 1)
    parts = []
    for mode in modes:
        if mode == "cls":
            first = m.int().argmax(dim=1)  # the first real token (left padding allowed)
            parts.append(h[torch.arange(h.shape[0]), first])
        elif mode == "max":
            parts.append(h.masked_fill(mf == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = mf.sum(dim=1).clamp(min=1e-9)
            parts.append((h * mf).sum(dim=1) / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            weights = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1) - m.int().argmax(dim=1).view(-1, 1, 1)
            w = mf * weights
            parts.append((h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            values, idx = m.flip(1).max(1)
            last = torch.where(values == 0, h.shape[1] - 1, h.shape[1] - idx - 1)
            parts.append((h * mf)[torch.arange(h.shape[0]), last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}; known: {', '.join(POOLING_MODES)}")
    out = torch.cat(parts, dim=-1)
    return F.normalize(out, p=2, dim=1) if normalize else out


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB; None when identical (infinite)."""
    noise = (reference - approx).pow(2).sum()
    if float(noise) == 0.0:
        return None
    return float(10 * torch.log10(reference.pow(2).sum() / noise))
