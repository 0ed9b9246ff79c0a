"""Timing: call functions in turn, after warm-up, until each has enough samples; summarise.

Shared by the latency measurement (``measure``) and the compute-mode trial (``compute``), so a
kernel is chosen by the same clock that later reports it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


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
