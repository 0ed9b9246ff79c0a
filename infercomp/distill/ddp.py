"""Scale-out: the same command under ``torchrun`` trains with DistributedDataParallel.

Ranks are read from the environment torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). gloo on CPU, NCCL on CUDA. Each rank takes a deterministic shard
of every global batch (DistributedSampler-style striding), so ``--batch-size`` is the per-rank
batch and the global batch is ``batch_size * world_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from infercomp.errors import UsageError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world 1, rank 0 for an ordinary run)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    """The job layout torchrun describes in the environment (defaults: a single process)."""
    values = {}
    for key, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        raw = os.environ.get(key)
        try:
            values[key] = default if raw in (None, "") else int(raw)
        except ValueError as e:
            raise UsageError(f"environment variable {key}={raw!r} is not an integer (set by torchrun)") from e
    d = Dist(world=values["WORLD_SIZE"], rank=values["RANK"], local_rank=values["LOCAL_RANK"])
    if d.world < 1 or not 0 <= d.rank < d.world:
        raise UsageError(f"RANK={d.rank} / WORLD_SIZE={d.world} from the environment do not describe a valid job")
    return d


def setup(device: torch.device) -> tuple[Dist, torch.device, bool]:
    """Join the process group when running under torchrun. Returns (layout, this rank's device,
    whether this call created the group and so must destroy it)."""
    d = from_env()
    if not d.active:
        return d, device, False
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return d, device, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device, True


def teardown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(indices: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's share of one global batch: every ``world``-th index starting at ``rank``."""
    return indices[d.rank :: d.world]


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (an interrupt seen by one rank stops all at the same step)."""
    if not d.active:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(t: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """Every rank's tensor ``t`` (same shape and dtype on every rank), in rank order, on every rank."""
    if not d.active:
        return [t]
    out = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(out, t.contiguous())
    return out
