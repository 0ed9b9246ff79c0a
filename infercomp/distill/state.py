"""The resumable training state, stored next to the output as ``OUT_STEM.train-state.safetensors``.

Tensors (student and projection weights, optimizer moments, every rank's RNG state, the best
student so far) go into one safetensors file; everything else (epoch, step, scores, the options
that produced it) is JSON in its metadata. No pickle: the optimizer state is flattened to
``optim.<param index>.<key>`` tensors. Written atomically by the checkpoint writer, so an
interrupted save leaves the previous state intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from infercomp.checkpoint import write_safetensors
from infercomp.errors import CheckpointError

STATE_FORMAT = 1
_META_KEY = "infercomp.train_state"


def state_path(output: Path) -> Path:
    """Where the training state for ``output`` lives: ``dir/student.safetensors`` ->
    ``dir/student.train-state.safetensors``."""
    return output.with_name(f"{output.stem}.train-state.safetensors")


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped.

    Attributes:
        epoch / step: the next step to run is ``step`` of epoch ``epoch`` (0-based);
            ``global_step`` counts all steps run so far (drives the learning-rate schedule).
        model: the trained modules' state dict (``student.*``, ``features.*``).
        optimizer: flattened optimizer state (see :func:`flatten_optimizer`).
        rng: each rank's torch CPU RNG state (and CUDA's when used), in rank order.
        best: the best student's state dict by validation score, or None.
        info: JSON-able scalars: config, world size, data size, scores, per-epoch log, finished.
    """

    epoch: int
    step: int
    global_step: int
    model: dict[str, torch.Tensor]
    optimizer: tuple[dict[str, torch.Tensor], dict[str, Any]]
    rng: list[torch.Tensor]
    best: dict[str, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state -> (tensors named ``<param index>.<key>``, JSON for non-tensor entries).
    Param groups are not stored: the trainer rebuilds them from the same options."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for idx, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                extra[f"{idx}.{key}"] = value
    return tensors, extra


def restore_optimizer(opt: torch.optim.Optimizer, flat: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
    """Load what :func:`flatten_optimizer` produced into an optimizer built with the same params."""
    tensors, extra = flat
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *extra.items()]:
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def save(path: Path, st: TrainState) -> None:
    """Write ``st`` atomically; a crash or Ctrl-C mid-write leaves the previous file as it was."""
    tensors: dict[str, torch.Tensor] = {}

    def put(prefix: str, d: dict[str, torch.Tensor]) -> None:
        for k, v in d.items():
            tensors[f"{prefix}{k}"] = v.detach().cpu().clone().contiguous()

    put("model.", st.model)
    put("optim.", st.optimizer[0])
    put("rng.", {str(r): t for r, t in enumerate(st.rng)})
    if st.best is not None:
        put("best.", st.best)
    info = {
        "format": STATE_FORMAT,
        "epoch": st.epoch,
        "step": st.step,
        "global_step": st.global_step,
        "optim_extra": st.optimizer[1],
        "has_best": st.best is not None,
        **st.info,
    }
    write_safetensors(path, tensors, {_META_KEY: json.dumps(info, sort_keys=True)}, what="the training state")


def load(path: Path) -> TrainState:
    """Read a state written by :func:`save`; errors say how to start over."""
    fix = f"delete {path} (or run without --resume) to start over"
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable training state ({e}); {fix}") from e
    try:
        info = json.loads(raw) if raw is not None else None
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state written by this infercomp; {fix}")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    rng = part("rng.")
    return TrainState(
        epoch=int(info.pop("epoch")),
        step=int(info.pop("step")),
        global_step=int(info.pop("global_step")),
        model=part("model."),
        optimizer=(part("optim."), dict(info.pop("optim_extra"))),
        rng=[rng[str(r)] for r in range(len(rng))],
        best=part("best.") if info.pop("has_best") else None,
        info=info,
    )
