"""Small Python API over the pipeline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from infercomp import checkpoint
from infercomp.data import load_data
from infercomp.measure import Comparison
from infercomp.models import ModelLoader


def load(
    path: str | os.PathLike[str], *, model: str | None = None, model_config: dict[str, Any] | None = None, trust_model_code: bool = False
) -> nn.Module:
    """Load a checkpoint written by infercomp (or any safetensors / weights-only state dict) as a
    runnable module in eval mode; quantized weights run quantized (Linear layers of at most
    ``quantize.runtime.SMALL_LAYER`` weights are decoded to float at load, where that is faster)."""
    loader = ModelLoader(ref=model, config=model_config, trust_model_code=trust_model_code)
    return loader.build(checkpoint.load(path))


def compare_files(
    paths: Sequence[str | os.PathLike[str]],
    *,
    data: str | os.PathLike[str] | None = None,
    model: str | None = None,
    model_config: dict[str, Any] | None = None,
    trust_model_code: bool = False,
    **measure_options: Any,
) -> Comparison:
    """What ``infercomp report`` computes, as a ``Comparison``."""
    from infercomp.pipeline import MeasureOptions, compare

    loader = ModelLoader(ref=model, config=model_config, trust_model_code=trust_model_code)
    ckpts = [checkpoint.load(Path(p)) for p in paths]
    dataset = load_data(data) if data is not None else None
    return compare(ckpts, loader=loader, options=MeasureOptions(**measure_options), data=dataset)
