"""The one pipeline every transform runs: load -> transform -> save -> compare.

``report`` is the comparison alone (``measure.compare``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import infercomp.checkpoint as checkpoint
import infercomp.hf as hf
from infercomp.data import load_data
from infercomp.distill import DistillConfig, distill
from infercomp.errors import CheckpointError, InfercompError, ModelError, UsageError
from infercomp.export import EXPORTS, ExportConfig, dense, export
from infercomp.measure import Comparison, MeasureOptions, check_data, compare
from infercomp.models import ModelLoader
from infercomp.patterns import selected
from infercomp.progress import NULL, Progress
from infercomp.prune import PruneConfig, prune
from infercomp.quantize import CASTS, QuantizeConfig, quantize
from infercomp.stream import run as run_streamed
from infercomp.stream import wanted as stream_wanted
from infercomp.transform import Context, Transform, TransformConfig, pinned_threads
from infercomp.version import __version__

# Config type -> transform function: the explicit dispatch table.
TRANSFORMS: dict[type[TransformConfig], Transform] = {
    PruneConfig: prune,
    QuantizeConfig: quantize,
    DistillConfig: distill,
    ExportConfig: export,
}


def _for_hf_output(config: TransformConfig, model_config: dict[str, Any], note: Callable[[str], None], *, dense: bool) -> TransformConfig:
    """What changes when the output is a Hugging Face directory that transformers must load
    (``dense``: written with --export dense, so how weights are quantized does not matter); each
    change is said through ``note``."""
    if isinstance(config, PruneConfig) and config.method == "channel" and config.scope != "ffn" and not hf.describes_heads(model_config):
        kind = model_config.get("model_type", "this architecture")
        if config.scope == "heads":
            raise UsageError(
                f"{kind}'s config.json cannot describe pruned attention heads (transformers derives the head size from "
                "hidden_size / num_attention_heads): use --scope ffn for a Hugging Face directory, or write one file with "
                "-o NAME.safetensors (infercomp loads it)"
            )
        note(f"--scope ffn for a Hugging Face directory: {kind}'s config.json cannot describe pruned attention heads")
        return dataclasses.replace(config, scope="ffn")
    if dense or not isinstance(config, QuantizeConfig) or config.scheme in CASTS:
        return config
    if config.column_scales is None and config.scheme in ("int8", "int4"):
        note("column scales off for a Hugging Face directory (compressed-tensors has no field for them; --column-scales forces ours)")
        config = dataclasses.replace(config, column_scales=False)
    # Quantized, they would be written back dense (their rounding error kept at float's size).
    try:
        candidates = hf.non_linear_weights(model_config) if model_config.get("model_type") else []
    except ModelError:  # a model type transformers does not know (the user's --model builds it): no layer types to go by
        candidates = []
    left = [name for name in candidates if selected(name, config.include, config.exclude)]
    if left:
        note(
            f"{len(left)} weight(s) of layers that are not Linear left in float for a Hugging Face directory "
            f"(compressed-tensors' loaders quantize Linear layers only), e.g. {left[0]!r}"
        )
        config = dataclasses.replace(config, exclude=(*config.exclude, *left))
    return config


def _decoded_note(ckpt: checkpoint.Checkpoint, config: TransformConfig) -> str | None:
    """What pruning or quantizing an already quantized input does to it, said once: its weights
    are decoded to float first (pruning stores them in float; quantizing rounds them again)."""
    quantized = [c for e in ckpt.encodings.values() if not (c := str(e.get("codec", ""))).startswith("sparse")]
    if not quantized or config.transform not in ("prune", "quantize"):
        return None
    held = f"the input holds {len(quantized)} quantized weight(s) ({', '.join(sorted(set(quantized)))})"
    if config.transform == "prune":
        return f"{held}: they are decoded to float to be pruned, and stored in float; quantize the pruned output again"
    return f"{held}: they are quantized again from their decoded values, so the rounding errors add up; quantize the float original where you have it"


def _config_json(d: Path) -> dict[str, Any]:
    """The directory's config.json, which a Hugging Face directory output needs, with the model
    type it describes (a column-scales output's is kept aside, ``hf.OURS_MODEL_TYPE``)."""
    cfg = d / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{d}: has no config.json, which a Hugging Face directory output needs (-o NAME.safetensors writes one file)")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e.strerror if isinstance(e, OSError) else type(e).__name__})") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{cfg}: not a Hugging Face model config (no 'model_type' to pick a transformers class by)")
    ours = config.get("infercomp")
    if config.get("model_type") == hf.OURS_MODEL_TYPE and isinstance(ours, dict):  # a --column-scales output of ours
        return {**config, "model_type": ours.get("model_type")}
    return config


def run(
    source: str | Path,
    output: str | Path,
    config: TransformConfig,
    *,
    loader: ModelLoader,
    options: MeasureOptions,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    force: bool = False,
    measure: bool = True,
    allow_nonfinite: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: Progress = NULL,
    on_saved: Callable[[Path], None] | None = None,
    stream: bool | None = None,
    export: str | None = None,
) -> Comparison:
    """Load ``source``, apply the transform ``config`` describes, write ``output`` atomically, and
    compare the two (the output is read back from disk, so what is measured is what was written).

    ``data`` feeds the transform (calibration, training) and the comparison, unless ``eval_data``
    is given for the comparison. With ``measure=False`` the comparison holds the static figures
    only (size, parameters, sparsity; no model is run). ``on_saved(output)`` runs once the output
    is safely written (distill drops its resumable training state there). A source holding NaN or
    infinite values is refused unless ``allow_nonfinite``. ``stream`` (True, False, None: auto)
    runs a weight-only transform tensor by tensor (``infercomp.stream``). ``export="dense"`` writes
    plain dense tensors (``infercomp.export``) instead of the compressed forms.
    """
    src, out = Path(source), Path(output)
    if export is not None and export not in EXPORTS:
        raise UsageError(f"--export {export}: choose one of {', '.join(EXPORTS)}")
    if export is not None and stream:
        raise UsageError("--export dense reads the whole checkpoint; drop --stream")
    # A Hugging Face directory in gives one out, unless -o names a single .safetensors file.
    hf_out = src.is_dir() and out.suffix != ".safetensors"
    notes: list[str] = []  # about the output's form: logged, and in the output's report

    logged = [0]  # notes logged so far: those about the output's form wait until the input has loaded

    def flush() -> None:
        for pending in notes[logged[0] :]:
            progress.log(pending)
        logged[0] = len(notes)

    def note(text: str, now: bool = True) -> None:
        notes.append(text)
        if now:
            flush()

    if hf_out:  # what transformers cannot load is changed or refused before any work (config.json is enough)
        config = _for_hf_output(config, _config_json(src), lambda text: note(text, now=False), dense=export == "dense")
    streamed = export is None and stream_wanted(src, out, config, stream, progress)
    if streamed:  # weight-only, tensor by tensor: see infercomp.stream (--stream)
        decoded = _decoded_note(checkpoint.load(src, lazy=True), config)
        if decoded:
            note(decoded, now=False)
        flush()
        result = run_streamed(
            src, out, config, loader=loader, options=options, progress=progress, data=data, eval_data=eval_data, force=force,
            measure=measure, allow_nonfinite=allow_nonfinite, max_shard_size=max_shard_size, on_saved=on_saved,
        )  # fmt: skip
        result.models[-1].notes[:0] = notes
        return result
    before = checkpoint.stamp(src)
    ckpt = checkpoint.load(src)
    decoded = _decoded_note(ckpt, config)
    if decoded:
        note(decoded, now=False)
    flush()
    if not allow_nonfinite:
        checkpoint.check_finite(ckpt)
    reads = tuple(Path(p) for p in (*config.inputs(), data, eval_data) if p is not None)
    checkpoint.check_output(out, force=force, source=src, inputs=reads, directory=hf_out)  # fail before any expensive work
    dataset = load_data(data, model=src) if data is not None else None
    evaluation = load_data(eval_data, model=src) if eval_data is not None else dataset
    check_data(ckpt, loader, [dataset, evaluation], options.torch_device())  # bad data: exit 2 before any work, nothing written
    ctx = Context(loader=loader, data=dataset, device=options.torch_device(), progress=progress, source=src, output=out)
    with progress.task(f"{config.transform}: {src.name}", total=None), pinned_threads(config.threads):
        new = TRANSFORMS[type(config)](ckpt, config, ctx)
        if export == "dense":  # --export dense: plain tensors for loaders that know no compression format
            new = dense(new)
            spec = new.model or {}
            if hf_out and spec.get("ref") == hf.HF_REF and isinstance(spec.get("config"), dict):
                new.tensors, grown = hf.padded(new.tensors, spec["config"])
                if grown:
                    note(
                        f"{len(grown)} tensor(s) of layers pruned to different widths zero-padded to config.json's sizes for "
                        f"transformers (e.g. {grown[0]!r}): the same outputs, not smaller; -o NAME.safetensors keeps them pruned"
                    )
    if new.model is None:
        new.model = loader.spec_for(ckpt)
    new.history = [
        *ckpt.history,
        {
            "transform": config.transform,
            "config": config.to_dict(),
            "source_sha256": checkpoint.sha256(src),
            "infercomp_version": __version__,
        },
    ]
    built = None
    if (measure or hf_out) and loader.can_build(new):
        new.path = out  # named as the output in errors
        try:
            built = loader.build(new, runtime=False)  # the output must load into its model: checked before anything is written
        except InfercompError as e:
            raise type(e)(f"{e} (the model transformed from {src}; nothing was written)") from e
    checkpoint.check_unchanged(src, before)  # the output would mix two versions of the input
    if hf_out:
        types = {name: type(m).__name__ for name, m in (built.named_modules() if built is not None else [])}
        st = (src / "modules.json").exists()
        to_write, hf_config, said = hf.output_checkpoint(new, types, dict((new.model or {}).get("config") or {}), sentence_transformers=st)
        for text in [*said, *checkpoint.other_weights_notes(src)]:
            note(text)
        checkpoint.save_dir(to_write, out, source=src, config=hf_config, force=force, max_shard_size=max_shard_size)
    else:
        checkpoint.save(new, out, force=force, source=src)
    with checkpoint.after_write(out, on_kept=on_saved):  # exit 2 from here on removes the output; an interrupt keeps it
        written = checkpoint.load(out)
        if not measure:
            result = compare([ckpt, written], loader=loader, options=options, progress=progress, run_models=False)
        else:  # the output's model reference is stored in it (and the user's --model, if any, applies to both)
            result = compare([ckpt, written], loader=loader, options=options, data=evaluation, progress=progress)
    if on_saved is not None:
        on_saved(out)
    result.models[-1].notes[:0] = notes
    return result
