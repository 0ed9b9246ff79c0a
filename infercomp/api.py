"""The Python API: one verb per subcommand, keyword options named like the CLI flags.

    import infercomp
    result = infercomp.quantize("model.safetensors", "model_int8.safetensors", scheme="int8", data="test.safetensors")
    print(result.models[1].ratios["size"])

Each transform verb writes its output atomically and returns the same ``Comparison`` the CLI
renders (``measure=False`` skips running the models: static figures only; a checkpoint holding
NaN or infinity is refused unless ``allow_nonfinite=True``). A Hugging Face directory in gives a
Hugging Face directory out (``max_shard_size`` per safetensors shard) unless ``output`` ends in
``.safetensors``. Measurement options
(``device``, ``threads``, ``batch_size``, ``min_time``, ``warmup``, ``latency``, ``layers``,
``memory``, ``compute``, ``compile``) are passed as keywords too. The CLI commands call these verbs and nothing deeper.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

import infercomp.allocator as allocator
import infercomp.checkpoint as checkpoint
from infercomp.data import load_data
from infercomp.distill import DistillConfig, ddp, run_rank, state_path
from infercomp.errors import UsageError
from infercomp.export import ExportConfig
from infercomp.measure import Comparison, MeasureOptions, compare
from infercomp.models import ModelLoader, example_batch
from infercomp.pipeline import run
from infercomp.progress import NULL, Progress
from infercomp.prune import PruneConfig
from infercomp.quantize import QuantizeConfig
from infercomp.sensitivity import DEFAULT_MAX_DROP, analyse
from infercomp.transform import TransformConfig

PathLike = str | os.PathLike[str]
_MEASURE_OPTIONS = tuple(f.name for f in dataclasses.fields(MeasureOptions))


def _measure_options(options: dict[str, Any]) -> MeasureOptions:
    unknown = sorted(set(options) - set(_MEASURE_OPTIONS))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; measurement options are: {', '.join(_MEASURE_OPTIONS)}")
    return MeasureOptions(**options)


def _loader(model: str | None, model_config: dict[str, Any] | None, trust_model_code: bool, trusted: Sequence[str] = ()) -> ModelLoader:
    return ModelLoader(ref=model, config=model_config, trust_model_code=trust_model_code, trusted=frozenset(trusted))


def load(
    path: PathLike,
    *,
    compute: str = "auto",
    compile: bool = False,
    example: Any = None,
    device: str = "cpu",
    model: str | None = None,
    model_config: dict[str, Any] | None = None,
    trust_model_code: bool = False,
) -> nn.Module:
    """Load a checkpoint written by infercomp (or any safetensors / weights-only state dict) as a
    runnable module in eval mode, running as ``compute`` says.

    Args:
        path: ``.safetensors`` file, Hugging Face directory, or ``.pt/.pth/.bin`` state dict.
        compute: ``auto`` (time the modes the storage allows on ``example``, keep the fastest;
            cached per machine), ``fp32``, ``bf16`` or ``int8`` (see ``infercomp.compute``).
        example: an input batch to choose on (default: 32 samples of the model's known input
            shape, or 128 random tokens for a Hugging Face text model).
        device: ``cpu`` or ``cuda``.
        compile: wrap the module in ``torch.compile`` (compiled on its first call).
        model / model_config: model code when the checkpoint names none (or to override it).
        trust_model_code: import model code named inside the checkpoint even if not built in.

    On the CPU this also sets glibc's malloc thresholds of the calling process for running models
    (``infercomp.allocator``; ``INFERCOMP_MALLOC=default`` leaves them alone).
    """
    ckpt = checkpoint.load(path)
    loader = _loader(model, model_config, trust_model_code)
    options = MeasureOptions(device=device, compute=compute)
    if example is None:
        example = lambda m: example_batch(ckpt, loader, m, 32)  # noqa: E731 (built from the float module)
    module, _ = loader.build_for_inference(ckpt, compute=compute, device=options.torch_device(), example=example, compile=compile)
    return module


def _transform(config: TransformConfig, args: dict[str, Any], *, loader: ModelLoader | None = None, on_saved: Any = None) -> Comparison:
    """Run the pipeline for a verb: ``args`` are the verb's own arguments (``locals()``), from which
    the shared ones are taken (source or teacher, output, data, eval_data or val_data, force,
    measure, progress, the model options and ``measure_options``)."""
    loader = loader or _loader(args["model"], args["model_config"], args["trust_model_code"])
    return run(
        Path(args["source"] if "source" in args else args["teacher"]),
        Path(args["output"]),
        config,
        loader=loader,
        options=_measure_options(args["measure_options"]),
        data=args["data"],
        eval_data=args.get("eval_data", args.get("val_data")),
        force=args["force"],
        measure=args["measure"],
        allow_nonfinite=args["allow_nonfinite"],
        max_shard_size=checkpoint.parse_size(str(args["max_shard_size"])),
        progress=args["progress"],
        on_saved=on_saved,
        stream=args.get("stream"),
        export=args.get("export"),
    )


def prune(
    source: PathLike,
    output: PathLike,
    *,
    method: str = "magnitude",
    sparsity: float = 0.5,
    scope: str | None = None,
    n: int | None = None,
    m: int | None = None,
    importance: str = "l1",
    bias_correction: bool = False,
    refine: bool | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    data: PathLike | None = None,
    eval_data: PathLike | None = None,
    force: bool = False,
    measure: bool = True,
    allow_nonfinite: bool = False,
    max_shard_size: str | int = "5GB",
    export: str | None = None,
    stream: bool | None = None,
    model: str | None = None,
    model_config: dict[str, Any] | None = None,
    trust_model_code: bool = False,
    progress: Progress = NULL,
    **measure_options: Any,
) -> Comparison:
    """``infercomp prune``: remove weights (``method``: magnitude, channel, 2:4, wanda, sparsegpt; see
    ``PruneConfig``), write ``output``, and compare it with ``source``. ``stream`` (None: auto)
    prunes by magnitude / N:M tensor by tensor (``infercomp.stream``)."""
    config = PruneConfig(
        method=method,
        sparsity=sparsity,
        scope=scope,
        include=tuple(include),
        exclude=tuple(exclude),
        n=n,
        m=m,
        importance=importance,
        bias_correction=bias_correction,
        refine=refine,
    )
    return _transform(config, locals())


def quantize(
    source: PathLike,
    output: PathLike,
    *,
    scheme: str = "int8",
    group_size: int | None = None,
    asymmetric: bool = False,
    method: str = "rtn",
    calib_samples: int = 128,
    column_scales: bool | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    data: PathLike | None = None,
    eval_data: PathLike | None = None,
    force: bool = False,
    measure: bool = True,
    allow_nonfinite: bool = False,
    max_shard_size: str | int = "5GB",
    export: str | None = None,
    stream: bool | None = None,
    model: str | None = None,
    model_config: dict[str, Any] | None = None,
    trust_model_code: bool = False,
    progress: Progress = NULL,
    **measure_options: Any,
) -> Comparison:
    """``infercomp quantize``: store weights in fewer bits (``scheme``: int8, int8-dynamic, int4,
    fp8, fp16, bf16; see ``QuantizeConfig``), write ``output``, and compare it with ``source``.
    ``stream`` (None: auto) quantizes round-to-nearest tensor by tensor (``infercomp.stream``)."""
    config = QuantizeConfig(
        scheme=scheme,
        group_size=group_size,
        asymmetric=asymmetric,
        method=method,
        calib_samples=calib_samples,
        column_scales=column_scales,
        include=tuple(include),
        exclude=tuple(exclude),
    )
    return _transform(config, locals())


def distill(
    teacher: PathLike,
    output: PathLike,
    *,
    data: PathLike,
    student: PathLike | None = None,
    student_model: str | None = None,
    student_config: dict[str, Any] | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    epochs: int = 10,
    lr: float | None = None,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    val_data: PathLike | None = None,
    output_loss: str = "kl",
    feature_loss: str = "none",
    feature_layers: Sequence[str] = (),
    feature_weight: float = 1.0,
    resume: bool = False,
    force: bool = False,
    measure: bool = True,
    allow_nonfinite: bool = False,
    max_shard_size: str | int = "5GB",
    export: str | None = None,
    model: str | None = None,
    model_config: dict[str, Any] | None = None,
    trust_model_code: bool = False,
    progress: Progress = NULL,
    **measure_options: Any,
) -> Comparison | None:
    """``infercomp distill``: train a student (``student`` checkpoint, or fresh ``student_model``)
    on the teacher's softened outputs over ``data``, write it, and compare teacher and student
    (on ``val_data`` when given). ``batch_size`` is the training batch per process and the
    evaluation batch. Under torchrun, ranks other than 0 train alongside and return None."""
    config = DistillConfig(
        student=None if student is None else str(student),
        student_model=student_model,
        student_config=dict(student_config or {}),
        temperature=temperature,
        alpha=alpha,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        seed=seed,
        val_data=None if val_data is None else str(val_data),
        output_loss=output_loss,
        feature_loss=feature_loss,
        feature_layers=tuple(feature_layers),
        feature_weight=feature_weight,
        resume=resume,
    )
    # The student's model code was named by the caller: trusted, and used for the output.
    loader = _loader(model, model_config, trust_model_code, trusted=[student_model] if student_model else [])
    measure_options = {"batch_size": batch_size, **measure_options}  # one batch size for training and evaluation
    if not ddp.from_env().main:  # torchrun rank > 0: train alongside rank 0, write and print nothing
        run_rank(teacher, output, config, loader=loader, data=data, device=_measure_options(measure_options).torch_device())
        return None
    on_saved = lambda out: state_path(out).unlink(missing_ok=True)  # noqa: E731 (written: nothing left to resume)
    return _transform(config, locals(), loader=loader, on_saved=on_saved)


def export(
    source: PathLike,
    output: PathLike,
    *,
    dtype: str | None = None,
    data: PathLike | None = None,
    force: bool = False,
    measure: bool = True,
    allow_nonfinite: bool = False,
    max_shard_size: str | int = "5GB",
    model: str | None = None,
    model_config: dict[str, Any] | None = None,
    trust_model_code: bool = False,
    progress: Progress = NULL,
    **measure_options: Any,
) -> Comparison:
    """``infercomp export``: write ``source`` as plain dense tensors (``dtype``: fp32, fp16, bf16;
    None keeps each tensor's logical dtype) in its own layout, for loaders that know no compression
    format, and compare the two."""
    config = ExportConfig(dtype=dtype)
    return _transform(config, locals())


def report(
    paths: PathLike | Sequence[PathLike],
    *,
    data: PathLike | None = None,
    sensitivity: str | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
    allow_nonfinite: bool = False,
    model: str | None = None,
    model_config: dict[str, Any] | None = None,
    trust_model_code: bool = False,
    progress: Progress = NULL,
    **measure_options: Any,
) -> Comparison:
    """``infercomp report``: size, parameters, sparsity, latency and accuracy (or fidelity) of
    checkpoints side by side; the first is the baseline. ``sensitivity`` (``quantize:int4``,
    ``prune:magnitude:0.5``...) also ranks the first checkpoint's layers by the damage that
    compressing each alone does on ``data``, and suggests an exclude list within ``max_drop``.
    One path (a string or a ``Path``) is a report of that checkpoint alone."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UsageError("report needs at least one checkpoint")
    loader = _loader(model, model_config, trust_model_code)
    # Read lazily (one tensor at a time, bounded memory) unless a model will be built from it.
    ckpts = [checkpoint.load(p, lazy=True) for p in paths]
    ckpts = [c if sensitivity is None and not loader.can_build(c) else checkpoint.load(p) for c, p in zip(ckpts, paths)]
    if all(isinstance(c.tensors, checkpoint.LazyTensors) for c in ckpts):
        allocator.for_streaming()  # no model is built, so none is timed under it
    if not allow_nonfinite:
        for c in ckpts:
            checkpoint.check_finite(c)
    dataset = load_data(data, model=paths[0]) if data is not None else None
    if sensitivity is not None and dataset is None:
        raise UsageError("--sensitivity measures each layer's damage on --data: pass --data FILE")
    result = compare(ckpts, loader=loader, options=_measure_options(measure_options), data=dataset, progress=progress)
    if sensitivity is not None and dataset is not None:
        s = analyse(ckpts[0], sensitivity, loader=loader, data=dataset, max_drop=max_drop, progress=progress)
        result.sensitivity = dataclasses.asdict(s)
    return result
