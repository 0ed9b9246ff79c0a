"""Write the fuzz seed corpus: small valid checkpoints of each stored format (run once; the
files are committed, a few KB each)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infercomp import checkpoint  # noqa: E402
from infercomp.checkpoint import Checkpoint  # noqa: E402
from infercomp.models import ModelLoader  # noqa: E402
from infercomp.prune import PruneConfig, prune  # noqa: E402
from infercomp.quantize import QuantizeConfig, quantize  # noqa: E402
from infercomp.transform import Context  # noqa: E402


def main() -> None:
    out = ROOT / "fuzz" / "corpus"
    out.mkdir(exist_ok=True)
    torch.manual_seed(0)
    base = Checkpoint(
        tensors={"net.1.weight": torch.randn(32, 64), "net.1.bias": torch.randn(32), "net.3.weight": torch.randn(10, 32)},
        model={"ref": "digits-mlp", "config": {"hidden": [32]}},
    )
    ctx = Context(loader=ModelLoader(), data=None, device=torch.device("cpu"))
    checkpoint.save(base, out / "float32.safetensors", force=True)
    for name, ck in {
        "int4": quantize(base, QuantizeConfig(scheme="int4"), ctx),
        "int8_columns": quantize(base, QuantizeConfig(scheme="int8", column_scales=True), ctx),
        "fp8": quantize(base, QuantizeConfig(scheme="fp8"), ctx),
        "sparse24": prune(base, PruneConfig(method="2:4"), ctx),
    }.items():
        ck.model = base.model
        checkpoint.save(ck, out / f"{name}.safetensors", force=True)


if __name__ == "__main__":
    main()
