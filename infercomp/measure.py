"""Measurements: static size statistics, latency (interleaved, median/p90), accuracy, fidelity.

Library code: returns numbers, never prints. Anything not measured stays None (JSON null).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infercomp import encodings
from infercomp.checkpoint import Checkpoint
from infercomp.data import Dataset

SCHEMA = "infercomp.report/1"
# Float buffers that are statistics, not weights: left out of the parameter count.
_NOT_PARAMETERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class ModelReport:
    """One row of a comparison. Keys follow the ``infercomp.report/1`` schema (docs/report-json.md)."""

    path: str
    size_bytes: int | None = None
    parameters: int | None = None
    nonzero: int | None = None
    sparsity: float | None = None
    bits_per_weight: float | None = None
    dtypes: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] | None = None
    throughput_per_s: float | None = None
    peak_memory_bytes: int | None = None
    accuracy: float | None = None
    fidelity: dict[str, float] | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    accuracy_drop: float | None = None
    model: str | None = None
    history: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] | None = None


@dataclass
class Comparison:
    """Reports for several checkpoints; the first is the baseline."""

    settings: dict[str, Any]
    models: list[ModelReport]

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": SCHEMA, "settings": self.settings, "models": [asdict(m) for m in self.models]}
        for m in out["models"]:
            if m["layers"] is None:
                del m["layers"]
        return out


def is_weight(name: str, t: torch.Tensor) -> bool:
    """Counted as a parameter: floating-point and not a normalisation statistic."""
    return t.is_floating_point() and not name.endswith(_NOT_PARAMETERS)


def static_stats(ckpt: Checkpoint) -> dict[str, Any]:
    """Parameters, non-zeros, sparsity, bits per weight and dtype mix, from the tensors alone."""
    dense = encodings.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
    nbytes = encodings.stored_bytes(ckpt.tensors, ckpt.encodings, ckpt.name)
    params = nonzero = 0
    bits = 0
    mix: dict[str, int] = {}
    for name, t in dense.items():
        if not is_weight(name, t):
            continue
        n = t.numel()
        params += n
        nonzero += int(torch.count_nonzero(t))
        bits += 8 * nbytes[name]
        spec = ckpt.encodings.get(name)
        kind = spec["codec"] if spec else str(ckpt.tensors[name].dtype).removeprefix("torch.")
        mix[kind] = mix.get(kind, 0) + n
    return {
        "parameters": params,
        "nonzero": nonzero,
        "sparsity": (1 - nonzero / params) if params else 0.0,
        "bits_per_weight": bits / params if params else None,
        "dtypes": {k: v / params for k, v in sorted(mix.items())} if params else {},
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int = 3,
    min_time: float = 1.0,
    min_runs: int = 10,
    max_runs: int = 100_000,
) -> list[list[float]]:
    """Run each function ``warmup`` times, then call them in turn (one call each per round) until
    every one has ``min_runs`` samples and ``min_time`` seconds in total. Returns seconds per call.
    Interleaving makes slow drift (thermal, other load) hit all candidates alike; each round runs
    them in a fresh (seeded) random order so that no candidate always runs right after the same
    neighbour (caches and allocator state left by the previous model). A plain rotation would not
    do: it keeps every candidate's predecessor the same."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    gen = torch.Generator().manual_seed(0)
    rnd = 0
    while True:
        for i in torch.randperm(len(fns), generator=gen).tolist():
            t0 = time.perf_counter()
            fns[i]()
            sync(device)
            times[i].append(time.perf_counter() - t0)
        rnd += 1
        if rnd >= max_runs or (rnd >= min_runs and all(sum(t) >= min_time for t in times)):
            return times


def summarise(samples: Sequence[float]) -> dict[str, float]:
    """Median / p90 / mean in milliseconds, plus how many runs they come from."""
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return {"median": statistics.median(ms), "p90": p90, "mean": statistics.fmean(ms), "runs": len(ms)}


def first_output(y: Any) -> torch.Tensor:
    """Logits (or embeddings) from whatever a model returns: a tensor, a tuple, or a dict /
    ModelOutput (``logits`` if present, else its first value)."""
    if isinstance(y, (tuple, list)):
        return y[0]
    if isinstance(y, dict):
        return y.get("logits", next(iter(y.values())))
    return y


@torch.inference_mode()
def predict(module: nn.Module, data: Dataset, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """Outputs for every input, in order, as float32 on the CPU: shape (N, ...)."""
    outs = []
    for x, _ in data.batches(batch_size):
        outs.append(first_output(module(x.to(device))).float().cpu())
    return torch.cat(outs)


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


def peak_memory(path: str, spec: dict[str, Any], batch_shape: Sequence[int], device: torch.device) -> int | None:
    """Peak RSS of loading ``path`` and one forward pass on a batch of ``batch_shape``, measured in
    a fresh Python process (see ``infercomp.memprobe``). None if the probe fails."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "infercomp.memprobe", path, "--spec", json.dumps(spec), "--input-shape", json.dumps(list(batch_shape))]
    cmd += ["--device", str(device)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return None
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_memory_bytes"])
    except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return None  # not measured: null in the report, never a guess


def host_settings(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": device.type,
        "threads": threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
