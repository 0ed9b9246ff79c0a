"""``--data`` files: ``inputs`` (N, ...) and optional ``labels`` (N,), in .safetensors or .npz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from infercomp.errors import DataError
from infercomp.hf import tokenize


@dataclass(frozen=True)
class Dataset:
    """Inputs and (optionally) integer class labels, read from ``path``; for text, the attention
    mask (N, T) of the padded token ids (1 = a real token)."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    path: Path
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batches(self, batch_size: int):
        """Yield (inputs, labels-or-None) slices in order."""
        for i in range(0, len(self), batch_size):
            yield self.inputs[i : i + batch_size], None if self.labels is None else self.labels[i : i + batch_size]


def load_data(path: str | Path, *, model: str | Path | None = None) -> Dataset:
    """Read a data file; errors name the file and what is wrong with it.

    Args:
        path: ``.safetensors`` / ``.npz`` with ``inputs`` (and ``labels``), or text (``.txt``,
            ``.jsonl``) for Hugging Face models.
        model: the checkpoint the data feeds: a Hugging Face directory supplies the tokenizer
            that text data needs (the one place that choice is made).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    if p.suffix in (".txt", ".jsonl"):
        if model is None or not Path(model).is_dir():
            raise DataError(f"{p}: text data needs the model's tokenizer; use a Hugging Face model directory as the (first) input")
        try:
            ids, mask, labels = tokenize(p, Path(model))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start}); text data is one example a line, or JSON lines") from e
        return Dataset(inputs=ids, labels=labels, path=p, attention_mask=mask)
    if p.suffix == ".npz":
        with open(p, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # a .npz is a zip archive of .npy arrays
                raise DataError(f"{p}: not a .npz file (not a zip archive: numpy.savez writes one)")
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{p}: not a readable .npz file ({e})") from e
    elif p.suffix == ".safetensors":
        try:
            arrays = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DataError(f"{p}: not a valid safetensors data file ({e})") from e
    else:
        raise DataError(
            f"{p}: unsupported data format {p.suffix!r}; use .safetensors or .npz with 'inputs' (and 'labels'), or .txt/.jsonl text"
        )
    if "inputs" not in arrays:
        raise DataError(f"{p}: has no 'inputs' tensor (found: {', '.join(sorted(arrays)) or 'nothing'})")
    inputs = arrays["inputs"]
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise DataError(f"{p}: 'inputs' is empty")
    if inputs.is_floating_point():
        inputs = inputs.float()
        bad = int((~torch.isfinite(inputs)).sum())
        if bad:
            raise DataError(f"{p}: 'inputs' holds {bad} NaN or infinite value(s); clean the data first")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
            raise DataError(f"{p}: 'labels' must have shape ({inputs.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point():
            raise DataError(f"{p}: 'labels' must be integer class indices, got {labels.dtype}")
        labels = labels.long()
    return Dataset(inputs=inputs, labels=labels, path=p)
