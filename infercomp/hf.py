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

from infercomp.errors import DataError, ModelError

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
