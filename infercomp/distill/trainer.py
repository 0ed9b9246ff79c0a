"""The training loop: AdamW with linear warm-up then cosine decay, per-epoch validation and best
student, resumable state, clean stop on Ctrl-C / SIGTERM, and DistributedDataParallel under torchrun."""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infercomp import measure
from infercomp.data import Dataset
from infercomp.distill import ddp, state
from infercomp.distill.loss import FeatureMatch, kd_loss_per_sample
from infercomp.errors import UsageError
from infercomp.measure import first_output
from infercomp.progress import NULL, Progress


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5 % of steps (at least one), then cosine decay to 0."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run and every rank of a distributed run see the same order without sharing state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class Trainable(nn.Module):
    """The student plus the feature projections: one module, so DistributedDataParallel keeps
    every trained parameter in sync. ``forward`` returns (student outputs, per-sample feature
    loss or None); the teacher must have run on the same batch first (its hooks hold its features)."""

    def __init__(self, student: nn.Module, features: FeatureMatch | None):
        super().__init__()
        self.student = student
        self.features = features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = first_output(self.student(x))
        return out, None if self.features is None else self.features.loss_per_sample()


class _Interrupts:
    """While training, SIGINT / SIGTERM only set a flag: the loop stops at the next step boundary,
    saves a resumable state, and raises KeyboardInterrupt. A second signal stops at once (the state
    saved at the last epoch end stays intact)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Job:
    """What one training run needs besides the models.

    Attributes:
        data / val: training data and optional validation data (best student by validation score).
        state_file: where the resumable state lives (None: not saved, no resume).
        resume: continue from ``state_file`` when it exists.
        fingerprint: JSON-able description of the options; a saved state must match it to resume.
        masks: parameter name (in ``Trainable``) -> bool mask of the weights to keep; the zeros of
            an unstructured-pruned student stay zero.
    """

    data: Dataset
    val: Dataset | None
    device: torch.device
    state_file: Path | None = None
    resume: bool = False
    fingerprint: dict[str, Any] | None = None
    progress: Progress = NULL
    masks: dict[str, torch.Tensor] | None = None


def train(teacher: nn.Module, trainable: Trainable, config: Any, job: Job, d: ddp.Dist) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``trainable.student`` against ``teacher``; returns (the student's state dict — the
    best by validation score when ``job.val`` is given, else the last — and a summary)."""
    device, data, progress = job.device, job.data, job.progress
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainable.to(device)
    masks = {name: m.to(device) for name, m in (job.masks or {}).items()}
    params = dict(trainable.named_parameters())
    opt = torch.optim.AdamW(trainable.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n, world = len(data), d.world
    global_batch = config.batch_size * world
    if n < world:
        raise UsageError(f"{data.path}: {n} samples cannot be shared among {world} ranks")
    steps_per_epoch = math.ceil(n / global_batch)
    if 0 < n % global_batch < world:  # a last batch too small to give every rank a sample is dropped
        steps_per_epoch -= 1
    total = steps_per_epoch * config.epochs
    labels = data.labels
    need_teacher = config.alpha > 0 or trainable.features is not None or labels is None or bool((labels < 0).any())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    fingerprint = {"config": job.fingerprint, "world_size": world, "samples": n}

    epoch, step, global_step = 0, 0, 0
    best: dict[str, torch.Tensor] | None = None
    log: list[dict[str, Any]] = []
    resumed = _resume(job, d, fingerprint, trainable, opt)
    if resumed is not None:
        epoch, step, global_step = resumed.epoch, resumed.step, resumed.global_step
        best, log = resumed.best, list(resumed.info.get("log", []))
        progress.log(f"resuming from {job.state_file} at epoch {epoch + 1}, step {step + 1} of {steps_per_epoch}")
    best_score = max((e["val"] for e in log if e.get("val") is not None), default=None)
    model: nn.Module = trainable
    if d.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state(finished: bool) -> None:
        # Collective: every rank contributes its RNG state; rank 0 writes.
        rng = [t.cpu() for t in ddp.gather(rng_state(device).to(device if device.type == "cuda" else "cpu"), d)]
        if d.main and job.state_file is not None:
            info = {**fingerprint, "log": log, "finished": finished}
            st = state.TrainState(epoch, step, global_step, trainable.state_dict(), state.flatten_optimizer(opt), rng, best, info)
            state.save(job.state_file, st)

    summary: dict[str, Any] = {"steps": total, "resumed_at": None if resumed is None else global_step}
    with _Interrupts() as intr, progress.task("distilling", total=total) as task:
        task.advance(global_step)
        start = time.perf_counter()
        seen = 0
        while epoch < config.epochs:
            order = epoch_order(n, config.seed, epoch)
            trainable.train()
            loss_sum, loss_n = 0.0, 0
            while step < steps_per_epoch:
                if ddp.any_rank(intr.requested, d, device):
                    checkpoint_state(finished=False)
                    if job.state_file is not None:
                        progress.log(f"interrupted: training state saved to {job.state_file}; rerun with --resume to continue")
                    raise KeyboardInterrupt
                batch = order[step * global_batch : (step + 1) * global_batch]
                idx = ddp.local_slice(batch, d)
                x = data.inputs[idx].to(device)
                y = None if labels is None else labels[idx].to(device)
                for group in opt.param_groups:
                    group["lr"] = config.lr * lr_factor(global_step, total)
                with autocast:
                    t_out = None
                    if need_teacher:
                        with torch.no_grad():
                            t_out = first_output(teacher(x))
                    s_out, feat = model(x)
                per_sample = kd_loss_per_sample(
                    s_out, t_out, y, temperature=config.temperature, alpha=config.alpha, kind=config.output_loss
                )
                if feat is not None:
                    per_sample = per_sample + config.feature_weight * feat
                # Sum / global batch size, times world (DDP averages gradients over ranks): the same
                # gradient as a single process taking the whole global batch, even when uneven.
                loss = per_sample.sum() * (world / len(batch))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for name, m in masks.items():
                        params[name].mul_(m)
                step += 1
                global_step += 1
                seen += len(batch)
                loss_sum += float(per_sample.detach().sum())
                loss_n += len(idx)
                rate = seen / max(time.perf_counter() - start, 1e-9)
                task.advance(1, epoch=f"{epoch + 1}/{config.epochs}", loss=loss_sum / max(loss_n, 1), **{"samples/s": round(rate)})
            entry: dict[str, Any] = {"epoch": epoch + 1, "loss": round(loss_sum / max(loss_n, 1), 6), "val": None}
            note = ""
            if job.val is not None and d.main:
                entry["val"] = score = _validate(trainable.student, teacher, job.val, config.batch_size, device)
                if best_score is None or score >= best_score:  # ties go to the later (lower learning rate) epoch
                    best_score = score
                    best = {k: v.detach().cpu().clone() for k, v in trainable.student.state_dict().items()}
                    note = " (best so far)"
            log.append(entry)
            metric = "" if entry["val"] is None else f", validation {_metric_name(job.val)} {entry['val']:.4f}{note}"
            progress.log(f"epoch {epoch + 1}/{config.epochs}: loss {entry['loss']:.4f}{metric}")
            epoch, step = epoch + 1, 0
            checkpoint_state(finished=epoch == config.epochs)
        if intr.requested:  # a signal during the last validation: the finished state is saved
            raise KeyboardInterrupt
    trainable.eval()
    summary.update(log=log, best_score=best_score)
    if best is not None:
        return best, summary
    return {k: v.detach().cpu() for k, v in trainable.student.state_dict().items()}, summary


def _metric_name(val: Dataset | None) -> str:
    return "accuracy" if val is not None and val.labels is not None else "top-1 agreement with the teacher"


def _validate(student: nn.Module, teacher: nn.Module, val: Dataset, batch_size: int, device: torch.device) -> float:
    """Accuracy on labeled validation data, else top-1 agreement with the teacher."""
    was = student.training
    student.eval()
    with torch.no_grad():
        out = measure.predict(student, val, batch_size=batch_size, device=device)
        labelled = None if val.labels is None else measure.accuracy(out, val.labels)
        if labelled is not None:
            score = labelled
        else:
            ref = measure.predict(teacher, val, batch_size=batch_size, device=device)
            score = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    student.train(was)
    return round(score, 6)


def _resume(
    job: Job, d: ddp.Dist, fingerprint: dict[str, Any], trainable: Trainable, opt: torch.optim.Optimizer
) -> state.TrainState | None:
    path = job.state_file
    if path is None:
        if job.resume:
            raise UsageError("--resume needs an output path: the training state is kept next to it")
        return None
    exists = path.exists()
    everywhere = [bool(t.item()) for t in ddp.gather(torch.tensor([int(exists)], device=job.device), d)]
    if any(everywhere) and not all(everywhere):
        raise UsageError(f"{path}: visible on some ranks only; --resume across machines needs the output folder on a shared filesystem")
    if not job.resume:
        if exists and d.main:
            job.progress.log(f"{path}: found the state of an earlier run; starting over (pass --resume to continue it)")
        return None
    if not exists:
        job.progress.log(f"--resume: no saved state at {path}; starting from the beginning")
        return None
    st = state.load(path)
    saved = {k: st.info.get(k) for k in fingerprint}
    if saved != fingerprint:
        diff = [k for k in fingerprint if saved[k] != fingerprint[k]]
        if "config" in diff:
            a, b = saved["config"] or {}, fingerprint["config"] or {}
            diff = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] + [
                f for f in diff if f != "config"
            ]
        raise UsageError(
            f"{path}: saved by a run with other settings ({'; '.join(map(str, diff))}); "
            "rerun with the same options, or without --resume to start over"
        )
    trainable.load_state_dict(st.model)
    state.restore_optimizer(opt, st.optimizer)
    set_rng_state(st.rng[d.rank], job.device)
    return st


def rng_state(device: torch.device) -> torch.Tensor:
    """This process's RNG state as one byte tensor: torch's CPU generator, then the CUDA generator of
    ``device`` when training on a GPU (dropout there draws from it)."""
    cpu = torch.get_rng_state()
    return torch.cat([cpu, torch.cuda.get_rng_state(device)]) if device.type == "cuda" else cpu


def set_rng_state(t: torch.Tensor, device: torch.device) -> None:
    """Inverse of ``rng_state`` (a state saved on a GPU restores only its CPU part on CPU)."""
    n = torch.get_rng_state().numel()
    torch.set_rng_state(t[:n].contiguous())
    if device.type == "cuda" and t.numel() > n:
        torch.cuda.set_rng_state(t[n:].contiguous(), device)
