"""Knowledge distillation (Hinton et al., 2015): train a student on a teacher's softened outputs.

``distill(teacher_ckpt, DistillConfig(...), ctx) -> student Checkpoint``. Modules: ``config``
(``DistillConfig``), ``loss`` (KD, output and feature losses), ``trainer`` (the ``Trainer``:
schedule, validation, interrupts, DDP),
``state`` (resumable training state in safetensors + JSON), ``ddp`` (torchrun environment).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import infercomp.checkpoint as checkpoint
import infercomp.formats as formats
from infercomp.checkpoint import Checkpoint
from infercomp.data import Dataset, load_data
from infercomp.distill import ddp
from infercomp.distill.config import DistillConfig
from infercomp.distill.loss import FeatureMatch, kd_loss, kd_loss_per_sample, parse_layer_pairs
from infercomp.distill.state import state_path
from infercomp.distill.trainer import Job, Trainable, Trainer
from infercomp.errors import DataError, ModelError
from infercomp.formats.sparse import is_nm
from infercomp.models import ModelLoader, first_output, task_for
from infercomp.progress import NULL, Progress
from infercomp.transform import Context

SPARSE_CODECS = (formats.BITMASK.name, formats.BITMASK_24.name)


def _student(config: DistillConfig, loader: ModelLoader, teacher: Checkpoint) -> tuple[nn.Module, Checkpoint]:
    """The student module, and the checkpoint to record for it: its model reference, structured-
    pruning plan (carried into the output so the chain stays replayable) and encodings (its sparse
    weights are stored sparse again, ``_sparse_again``); no tensors."""
    if config.student is not None:
        sc = checkpoint.load(config.student)
        if sc.model is None and loader.spec_for(sc) is None:  # a bare state dict: assume the teacher's architecture
            sc.model = loader.spec_for(teacher)
        record = Checkpoint(tensors={}, model=loader.spec_for(sc) or {}, plan=sc.plan, encodings=dict(sc.encodings))
        return loader.build(sc, runtime=False), record
    torch.manual_seed(config.seed)
    spec = {"ref": config.student_model, "config": dict(config.student_config)}
    return ModelLoader(ref=config.student_model, config=spec["config"]).build_fresh(), Checkpoint(tensors={}, model=spec)


def _recorded_sparse(student: str | None) -> bool:
    """Whether the student is a Hugging Face directory whose config.json records sparse weights
    (a ``sparsity_config``): they are stored dense there, so only that record says the zeros are
    pruning, not, say, int4 values that rounded to 0."""
    if student is None:
        return False
    try:
        q = json.loads((Path(student) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and isinstance(q.get("sparsity_config"), dict)


def _sparse_again(
    tensors: dict[str, torch.Tensor], encodings: dict[str, dict[str, Any]], masked: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trained ``tensors`` with the student's sparse weights stored sparse again: training kept
    their zeros (``masked``: the names ``_sparsity_masks`` held), so the output stays as small as
    the student and a Hugging Face directory records their structure. Each keeps the student's
    codec; a student that stored them dense with a record that they are sparse (a Hugging Face
    directory, ``_recorded_sparse``) gets 2:4 where every group of 4 holds 2 zeros, else the
    bitmask (where it is smaller)."""
    stored: dict[str, torch.Tensor] = {}
    specs: dict[str, Any] = {}
    for name, t in tensors.items():
        spec = encodings.get(name) or {}
        codec = spec.get("codec")
        if codec not in SPARSE_CODECS and name in masked:
            codec = formats.BITMASK_24.name if is_nm(t, 2, 4) else formats.BITMASK.name
            spec = {"pattern": "2:4"} if codec == formats.BITMASK_24.name else {}
        if codec in SPARSE_CODECS:
            extra = {"pattern": spec["pattern"]} if "pattern" in spec else None
            parts, new = formats.FORMATS[codec].encode(name, t, extra=extra)
            stored.update(parts)
            if new is not None:
                specs[name] = new
        else:
            stored[name] = t
    return stored, specs


def _sparsity_masks(student: nn.Module, min_zeros: float = 0.01) -> dict[str, torch.Tensor]:
    """Keep-masks for the student's weight matrices / filters that are at least ``min_zeros``
    exact zeros (unstructured pruning; trained dense weights are practically never exactly 0),
    keyed by their name in ``Trainable``."""
    masks = {}
    for name, p in student.named_parameters():
        if p.dim() >= 2 and p.is_floating_point():
            keep = p.detach() != 0
            if 1 - float(keep.float().mean()) >= min_zeros:
                masks[f"student.{name}"] = keep
    return masks


def _check_fit(teacher: nn.Module, student: nn.Module, data: Dataset, config: DistillConfig, teacher_name: str) -> None:
    """Fail early, naming the problem, when the student cannot learn from this teacher on this data."""
    probe = data.inputs[:2]
    with torch.no_grad():
        try:
            t_out = first_output(teacher(probe))
        except Exception as e:  # model code: report the shape problem, not a traceback
            raise DataError(f"{data.path}: the teacher cannot run on 'inputs' of shape {tuple(probe.shape[1:])}: {e}") from e
        try:
            s_out = first_output(student(probe))
        except Exception as e:
            raise ModelError(f"the student cannot run on {data.path} 'inputs' of shape {tuple(probe.shape[1:])}: {e}") from e
    if t_out.shape != s_out.shape:
        raise ModelError(
            f"student output shape {tuple(s_out.shape[1:])} differs from the teacher's {tuple(t_out.shape[1:])} ({teacher_name}); "
            "the student must produce the same outputs (e.g. the same number of classes) — check --student-config"
        )
    if config.output_loss == "kl" and t_out.dim() < 2:
        raise ModelError(f"--output-loss kl needs class scores of shape (N, C); the models return {tuple(t_out.shape)}")
    if data.labels is not None and config.alpha < 1 and t_out.dim() >= 2:
        top = int(data.labels.max())
        if top >= t_out.shape[-1]:
            raise DataError(f"{data.path}: 'labels' go up to {top} but the models output {t_out.shape[-1]} classes")


def distill(teacher_ckpt: Checkpoint, config: DistillConfig, ctx: Context) -> Checkpoint:
    """Train the student against the teacher on ``ctx.data``; return the student checkpoint.

    Under torchrun every rank calls this (see :func:`run_rank`); all ranks train, rank 0's result is
    the one written. The training state is kept next to ``ctx.output`` (see ``state.state_path``).
    """
    if ctx.data is None:
        raise DataError("distill needs --data with training 'inputs' (and optional 'labels')")
    data = ctx.data
    d, device, created = ddp.setup(ctx.device)
    progress: Progress = ctx.progress if d.main else NULL
    try:
        teacher = ctx.loader.build(teacher_ckpt, runtime=False)
        student, record = _student(config, ctx.loader, teacher_ckpt)
        _check_fit(teacher, student, data, config, teacher_ckpt.name)
        if config.alpha == 0 and data.labels is None:
            progress.log("--alpha 0 but the training data has no 'labels': every sample learns from the teacher alone")
        val = load_data(config.val_data, model=ctx.source) if config.val_data is not None else None
        if val is not None:  # scored after every epoch: a file the models cannot take fails now, not after the first
            _check_fit(teacher, student, val, config, teacher_ckpt.name)
        torch.manual_seed(config.seed)  # projections initialise the same way on every rank and every run
        features = None
        if config.feature_loss == "mse":
            pairs = parse_layer_pairs(config.feature_layers, student, teacher)
            features = FeatureMatch(student, teacher, pairs, data.inputs[:2])
        trainable = Trainable(student, features)
        masks = _sparsity_masks(student) if config.student is not None else {}
        if masks:
            kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            progress.log(f"the student's pruned weights stay zero: {len(masks)} tensor(s), {1 - kept:.1%} zeros")
        job = Job(
            data=data,
            val=val,
            device=device,
            state_file=None if ctx.output is None else state_path(Path(ctx.output)),
            resume=config.resume,
            fingerprint=config.to_dict(),
            progress=progress,
            masks=masks,
            task=task_for(teacher_ckpt, teacher),
        )
        tensors = Trainer(teacher, trainable, config, job, d).run()
        if features is not None:
            features.close()
    finally:
        ddp.teardown(created)
    masked = {name.removeprefix("student.") for name in masks} if _recorded_sparse(config.student) else set()
    tensors, encodings = _sparse_again({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, record.encodings, masked)
    return Checkpoint(tensors=tensors, model=record.model, plan=record.plan, encodings=encodings)


def run_rank(
    teacher: str | Path, output: str | Path, config: DistillConfig, *, loader: ModelLoader, data: str | Path, device: torch.device
) -> None:
    """What a rank other than 0 runs under torchrun: the same training, without writing or printing
    (rank 0 runs the whole pipeline: it alone saves the output and compares)."""
    src = Path(teacher)
    ctx = Context(loader=loader, data=load_data(data, model=src), device=device, progress=NULL, source=src, output=Path(output))
    distill(checkpoint.load(src), config, ctx)


__all__ = ["DistillConfig", "distill", "kd_loss", "kd_loss_per_sample", "run_rank", "state_path"]
