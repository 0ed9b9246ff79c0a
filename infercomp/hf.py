"""Hugging Face directories (``config.json`` + safetensors): build the module with transformers'
own classes (trusted, no ``trust_remote_code``) and tokenize text ``--data``.

transformers is optional: only these paths import it, and a missing install is a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import infercomp.formats as formats
from infercomp.checkpoint import Checkpoint
from infercomp.errors import DataError, ModelError, UsageError

HF_REF = "hf-auto"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ModelError(
            "running a Hugging Face model needs transformers: pip install 'infercomp[hf]' (or pip install transformers)"
        ) from e
    transformers.logging.set_verbosity_error()
    return transformers


def build(config: dict[str, Any]) -> nn.Module:
    """An untrained module of the architecture ``config.json`` names (its first ``architectures``
    entry when transformers has that class, else AutoModel for its ``model_type``)."""
    tf = _transformers()
    cfg_dict = {k: v for k, v in config.items() if not k.startswith("_")}
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ModelError("config.json has no 'model_type'; cannot pick a transformers class")
    try:
        cfg = tf.AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, KeyError) as e:
        raise ModelError(f"transformers does not know model_type {model_type!r}: {e}") from e
    archs = config.get("architectures") or []
    cls = getattr(tf, archs[0], None) if archs else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        model = tf.AutoModel.from_config(cfg)
    else:
        model = cls(cfg)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is not None:
        model.register_forward_pre_hook(_mask_padding(pad), with_kwargs=True)
    return model


def _mask_padding(pad: int) -> Any:
    """Text --data is padded to the longest example: when a caller passes token ids alone, mask
    the padding as a tokenizer's attention_mask would."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        del module
        if args and "attention_mask" not in kwargs and torch.is_tensor(args[0]) and not args[0].is_floating_point():
            kwargs = {**kwargs, "attention_mask": (args[0] != pad).long()}
        return args, kwargs

    return hook


def tokenize(path: Path, tokenizer_dir: Path, *, max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``.txt`` (one example a line) or ``.jsonl`` (``{"text": ..., "label": ...}``) -> (token ids
    (N, T) int64 padded to the longest example, labels (N,) or None)."""
    tf = _transformers()
    texts: list[str] = []
    labels: list[int] = []
    if path.suffix == ".txt":
        texts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    else:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                if "label" in row:
                    labels.append(int(row["label"]))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}: line {i} is not a JSON object with a 'text' field and an integer 'label' (if any)") from e
    if not texts:
        raise DataError(f"{path}: holds no text examples")
    if labels and len(labels) != len(texts):
        raise DataError(f"{path}: 'label' is given for {len(labels)} of {len(texts)} examples; give it for all or none")
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{tokenizer_dir}: no tokenizer found to tokenize {path} (pass --tokenizer DIR)") from e
    enc = tok(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long(), torch.tensor(labels) if labels else None


# ------------------------------------------------------------------------------ Hugging Face out

# What compressed-tensors (and so transformers and vLLM) reads as we store it: int8 weights with
# int8 activations (W8A8, "int-quantized") and fp8 weights ("float-quantized"). Weight-only int8 and
# int4 are "pack-quantized" there (int32 words), a layout we do not write.
_CT_FORMATS = {"int8-dynamic": "int-quantized", "fp8": "float-quantized"}


def output_checkpoint(
    ckpt: Checkpoint, module_types: dict[str, str], config: dict[str, Any]
) -> tuple[Checkpoint, dict[str, Any], list[str]]:
    """``ckpt`` made loadable by transformers as a Hugging Face directory: (checkpoint to write,
    its config.json, notes for the user).

    Quantized Linear weights that compressed-tensors describes as we store them (int8 with dynamic
    per-token activations, fp8 per channel) stay stored and get a ``quantization_config`` in that
    format; everything else (sparse bitmasks, quantized embeddings or convolutions, column scales,
    which compressed-tensors has no field for) is written dense. Weight-only int8 / int4 are
    refused: compressed-tensors packs them into int32 words (``pack-quantized``), we do not.
    """
    notes: list[str] = []
    tensors, _ = formats.stored_form(ckpt.tensors, ckpt.encodings, ckpt.encodings, ckpt.name)  # the plain tensors
    kept: dict[str, dict[str, Any]] = {}
    dense_names = []
    for name, spec in ckpt.encodings.items():
        codec = spec.get("codec")
        module = name.removesuffix(".weight")
        if codec in ("int4", "int8"):
            raise UsageError(
                f"{ckpt.name}: weight-only {codec} is stored as plain bytes, while the compressed-tensors format that transformers "
                "and vLLM read packs it into int32 words ('pack-quantized'); write one file (-o NAME.safetensors, infercomp loads "
                "it), or use --scheme int8-dynamic, fp8, bf16 or fp16 for a Hugging Face directory"
            )
        if codec in _CT_FORMATS and module_types.get(module) == "Linear" and not spec.get("column_scale"):
            kept[name] = spec
            tensors.update({k: ckpt.tensors[k] for k in formats.format_for(name, spec, ckpt.name).keys(name, spec)})
        else:
            dense_names.append(name)
    if dense_names:
        dense = formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
        tensors.update({n: dense[n].contiguous() for n in dense_names})
        why = "sparse or column-scaled weights, or layers compressed-tensors does not quantize (embeddings, convolutions)"
        notes.append(f"{len(dense_names)} tensor(s) written dense for transformers ({why}), e.g. {dense_names[0]!r}")
    out = dict(config)
    if kept:
        out["quantization_config"] = _quantization_config(kept, module_types)
    floats = {str(t.dtype).removeprefix("torch.") for n, t in tensors.items() if t.is_floating_point() and n not in kept and t.dim() >= 2}
    if len(floats) == 1 and floats != {"float32"}:
        out["torch_dtype"] = floats.pop()
    return Checkpoint(tensors=tensors, model=ckpt.model, history=ckpt.history, encodings=kept, plan=ckpt.plan), out, notes


def _quantization_config(kept: dict[str, dict[str, Any]], module_types: dict[str, str]) -> dict[str, Any]:
    spec = next(iter(kept.values()))
    codec = spec["codec"]
    weights = {
        "num_bits": 8,
        "type": "float" if codec == "fp8" else "int",
        "symmetric": bool(spec.get("symmetric", True)),
        "strategy": "group" if spec.get("granularity") == "group" else "channel",
        "group_size": spec.get("group_size"),
        "dynamic": False,
    }
    activations = None
    if codec == "int8-dynamic":
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    quantized = {n.removesuffix(".weight") for n in kept}
    ignore = sorted(name for name, kind in module_types.items() if kind == "Linear" and name not in quantized)
    return {
        "quant_method": "compressed-tensors",
        "format": _CT_FORMATS[codec],
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "ignore": ignore,
    }
