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
from torch.nn.parallel import DistributedDataParallel

from infercomp.data import Dataset
from infercomp.distill.ddp import Dist, any_rank, gather, local_slice
from infercomp.distill.loss import FeatureMatch, kd_loss_per_sample
from infercomp.distill.state import TrainState, flatten_optimizer, restore_optimizer
from infercomp.distill.state import load as load_state
from infercomp.distill.state import save as save_state
from infercomp.errors import DataError, UsageError
from infercomp.metrics import accuracy, next_token_nll
from infercomp.models import Task, call, first_output, is_causal_lm, predict
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
        task: how the teacher's outputs are read (``models.task_for``): a sentence-embedding
            model is validated on its pooled, normalised embeddings, as the report scores it.
    """

    data: Dataset
    val: Dataset | None
    device: torch.device
    state_file: Path | None = None
    resume: bool = False
    fingerprint: dict[str, Any] | None = None
    progress: Progress = NULL
    masks: dict[str, torch.Tensor] | None = None
    task: Task | None = None


class Trainer:
    """One training run of ``trainable.student`` against ``teacher``: ``run()`` loops over epochs
    calling ``step()`` per batch and ``end_epoch()`` after each epoch, which validates and saves
    the resumable state (``save_state()``, also on an interrupt).

    Attributes (the run's position; restored on resume):
        epoch / step: the next step to run is ``step`` of epoch ``epoch`` (0-based).
        global_step: steps run so far (drives the learning-rate schedule).
        best / best_score: the best student so far by validation score (None without --val-data).
        log: one entry per finished epoch (loss, validation score).
    """

    def __init__(self, teacher: nn.Module, trainable: Trainable, config: Any, job: Job, d: Dist):
        self.teacher, self.trainable, self.config, self.job, self.d = teacher, trainable, config, job, d
        self.device = job.device
        teacher.to(self.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        trainable.to(self.device)
        self.masks = {name: m.to(self.device) for name, m in (job.masks or {}).items()}
        self.params = dict(trainable.named_parameters())
        self.opt = torch.optim.AdamW(trainable.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        n = len(job.data)
        self.global_batch = config.batch_size * d.world
        if n < d.world:
            raise UsageError(f"{job.data.path}: {n} samples cannot be shared among {d.world} ranks")
        self.steps_per_epoch = math.ceil(n / self.global_batch)
        if 0 < n % self.global_batch < d.world:  # a last batch too small to give every rank a sample is dropped
            self.steps_per_epoch -= 1
        self.total = self.steps_per_epoch * config.epochs
        labels = job.data.labels
        self.need_teacher = config.alpha > 0 or trainable.features is not None or labels is None or bool((labels < 0).any())
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self.fingerprint = {"config": job.fingerprint, "world_size": d.world, "samples": n}
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: dict[str, torch.Tensor] | None = None
        self.log: list[dict[str, Any]] = []
        resumed = _resume(job, d, self.fingerprint, trainable, self.opt)
        if resumed is not None:
            self.epoch, self.step_in_epoch, self.global_step = resumed.epoch, resumed.step, resumed.global_step
            self.best, self.log = resumed.best, list(resumed.info.get("log", []))
            job.progress.log(
                f"resuming from {job.state_file} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} of {self.steps_per_epoch}"
            )
        self.best_score = max((e["val"] for e in self.log if e.get("val") is not None), default=None)
        self.model: nn.Module = trainable
        if d.active:
            self.model = DistributedDataParallel(trainable, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def run(self) -> dict[str, torch.Tensor]:
        """Train to the last epoch; returns the student's state dict (the best by validation score
        when ``job.val`` is given, else the last). Ctrl-C / SIGTERM saves the state and raises
        KeyboardInterrupt."""
        config, progress = self.config, self.job.progress
        with _Interrupts() as intr, progress.task("distilling", total=self.total) as task:
            task.advance(self.global_step)
            start, seen = time.perf_counter(), 0
            while self.epoch < config.epochs:
                order = epoch_order(len(self.job.data), config.seed, self.epoch)
                self.trainable.train()
                loss_sum, loss_n = 0.0, 0
                while self.step_in_epoch < self.steps_per_epoch:
                    if any_rank(intr.requested, self.d, self.device):
                        self.save_state(finished=False)
                        if self.job.state_file is not None:
                            progress.log(f"interrupted: training state saved to {self.job.state_file}; rerun with --resume to continue")
                        raise KeyboardInterrupt
                    s = self.step_in_epoch
                    batch = order[s * self.global_batch : (s + 1) * self.global_batch]
                    total_loss, count = self.step(batch)
                    loss_sum += total_loss
                    loss_n += count
                    seen += len(batch)
                    rate = seen / max(time.perf_counter() - start, 1e-9)
                    task.advance(1, epoch=f"{self.epoch + 1}/{config.epochs}", loss=loss_sum / max(loss_n, 1), **{"samples/s": round(rate)})
                self.end_epoch(loss_sum / max(loss_n, 1))
            if intr.requested:  # a signal during the last validation: the finished state is saved
                raise KeyboardInterrupt
        self.trainable.eval()
        if self.best is not None:
            return self.best
        return {k: v.detach().cpu() for k, v in self.trainable.student.state_dict().items()}

    def step(self, batch: torch.Tensor) -> tuple[float, int]:
        """One optimiser step on this rank's share of the global ``batch`` (sample indices).
        Returns (sum of this rank's per-sample losses, its sample count)."""
        config, data = self.config, self.job.data
        idx = local_slice(batch, self.d)
        x = data.inputs[idx].to(self.device)
        y = None if data.labels is None else data.labels[idx].to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = config.lr * lr_factor(self.global_step, self.total)
        with self.autocast:
            t_out = None
            if self.need_teacher:
                with torch.no_grad():
                    t_out = first_output(self.teacher(x))
            s_out, feat = self.model(x)
        per_sample = kd_loss_per_sample(s_out, t_out, y, temperature=config.temperature, alpha=config.alpha, kind=config.output_loss)
        if feat is not None:
            per_sample = per_sample + config.feature_weight * feat
        # Sum / global batch size, times world (DDP averages gradients over ranks): the same
        # gradient as a single process taking the whole global batch, even when uneven.
        loss = per_sample.sum() * (self.d.world / len(batch))
        if not bool(torch.isfinite(loss)):
            # Stop before the update: the state saved at the last epoch end stays the last good one.
            kept = f"; the state saved at the end of epoch {self.epoch} is kept" if self.epoch and self.job.state_file else ""
            raise DataError(
                f"{self.job.data.path}: the training loss became {float(loss)} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"
                f" (non-finite inputs, labels or teacher outputs, or a learning rate too high: try a lower --lr){kept}"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for name, m in self.masks.items():
                self.params[name].mul_(m)
        self.step_in_epoch += 1
        self.global_step += 1
        return float(per_sample.detach().sum()), len(idx)

    def end_epoch(self, loss: float) -> None:
        """Validate (rank 0), keep the best student, log the epoch, save the state."""
        config, val = self.config, self.job.val
        entry: dict[str, Any] = {"epoch": self.epoch + 1, "loss": round(loss, 6), "val": None}
        note, metric = "", ""
        if val is not None and self.d.main:
            name, score = _validate(self.trainable.student, self.teacher, val, config.batch_size, self.device, self.job.task)
            entry["val"] = score
            if self.best_score is None or score >= self.best_score:  # ties go to the later (lower learning rate) epoch
                self.best_score = score
                self.best = {k: v.detach().cpu().clone() for k, v in self.trainable.student.state_dict().items()}
                note = " (best so far)"
            metric = f", validation {_shown(name, score)}{note}"
        self.log.append(entry)
        self.job.progress.log(f"epoch {self.epoch + 1}/{config.epochs}: loss {entry['loss']:.4f}{metric}")
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.save_state(finished=self.epoch == config.epochs)

    def save_state(self, finished: bool) -> None:
        """Collective: every rank contributes its RNG state; rank 0 writes the resumable state."""
        device = self.device
        rng = [t.cpu() for t in gather(rng_state(device).to(device if device.type == "cuda" else "cpu"), self.d)]
        if self.d.main and self.job.state_file is not None:
            info = {**self.fingerprint, "log": self.log, "finished": finished}
            st = TrainState(
                self.epoch,
                self.step_in_epoch,
                self.global_step,
                self.trainable.state_dict(),
                flatten_optimizer(self.opt),
                rng,
                self.best,
                info,
            )
            save_state(self.job.state_file, st)


def _shown(metric: str, score: float) -> str:
    """The validation score as the log line says it (perplexity is kept negated: higher is better)."""
    return f"perplexity {-score:.4f}" if metric == "perplexity" else f"{metric} {score:.4f}"


def _validate(
    student: nn.Module, teacher: nn.Module, val: Dataset, batch_size: int, device: torch.device, task: Task | None = None
) -> tuple[str, float]:
    """(what was scored, a score where higher is better): a causal LM's negated perplexity on the validation text
    (next real token; top-1 agreement with the teacher says little there: a pretrained student
    agrees on nearly every token from the first epoch on); else accuracy on labeled data; else
    agreement with the teacher's outputs: top-1 for class scores (N, C), mean cosine of each
    sample's outputs for anything else (hidden states: their argmax means nothing), of the
    pooled, normalised embeddings for a sentence-embedding ``task`` (padding left out)."""
    was = student.training
    student.eval()
    with torch.no_grad():
        if is_causal_lm(student):
            total, count = 0.0, 0
            for i in range(0, len(val), batch_size):
                ids = val.inputs[i : i + batch_size].to(device)
                mask = None if val.attention_mask is None else val.attention_mask[i : i + batch_size].to(device)
                s, n = next_token_nll(first_output(call(student, ids, mask)).float(), ids, mask)
                total, count = total + s, count + n
            name, score = "perplexity", -math.exp(total / max(count, 1))
        else:
            embed = task if task is not None and task.kind == "sentence-embedding" and val.labels is None else None
            out = predict(student, val, batch_size=batch_size, device=device, task=embed)
            labelled = None if val.labels is None else accuracy(out, val.labels)
            if labelled is not None:
                name, score = "accuracy", labelled
            else:
                ref = predict(teacher, val, batch_size=batch_size, device=device, task=embed)
                if out.dim() == 2 and embed is None:  # class scores
                    name, score = "top-1 agreement with the teacher", float((out.argmax(-1) == ref.argmax(-1)).float().mean())
                else:
                    cos = float(torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1).mean())
                    name, score = ("embedding cosine" if embed is not None else "output cosine") + " with the teacher", cos
    student.train(was)
    return name, round(score, 6)


def _resume(job: Job, d: Dist, fingerprint: dict[str, Any], trainable: Trainable, opt: torch.optim.Optimizer) -> TrainState | None:
    path = job.state_file
    if path is None:
        if job.resume:
            raise UsageError("--resume needs an output path: the training state is kept next to it")
        return None
    exists = path.exists()
    everywhere = [bool(t.item()) for t in gather(torch.tensor([int(exists)], device=job.device), d)]
    if any(everywhere) and not all(everywhere):
        raise UsageError(f"{path}: visible on some ranks only; --resume across machines needs the output folder on a shared filesystem")
    if not job.resume:
        if exists and d.main:
            job.progress.log(f"{path}: found the state of an earlier run; starting over (pass --resume to continue it)")
        return None
    if not exists:
        job.progress.log(f"--resume: no saved state at {path}; starting from the beginning")
        return None
    st = load_state(path)
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
    restore_optimizer(opt, st.optimizer)
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
