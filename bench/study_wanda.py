"""How far the wanda family gets on all-MiniLM-L6-v2 at 50 % unstructured sparsity: a study
behind issue 14's wanda figure (embedding cosine mean >= 0.92), not a target check.

    .venv/bin/python bench/study_wanda.py

Data and scoring are bench_hf.py's: its 128 ``TRAIN`` sentences are the only calibration text,
its 64 ``EVAL`` sentences are scored (cosine of the pooled, normalised sentence embedding against
the original's, mean and min). Nothing is chosen on EVAL: the one tuned setting (the depth slope
of the sparsity allocation) is picked by the cosine on TRAIN.

Rows:
- the product itself, through the CLI: ``--method wanda`` (its masks refined by swaps, the
  default), ``wanda --no-refine`` (the paper's masks), ``wanda --bias-correction``, ``sparsegpt``
  (the same mask shapes plus a weight update);
- in this script, on wanda's masks (50 % of each row of every Linear but the pooler, activation
  norms over the real tokens of TRAIN): other scores (``|W|·||x||^a``, ``|W|·mean|x|``, RIA's
  relative importance, norms without [CLS]/[SEP]), per-row corrections that need no weight
  reconstruction (the bias shift; a least-squares scale and shift of each output row), a
  non-uniform allocation (sparsity changing linearly with depth, 50 % overall), with either
  correction, and the CLI's mask swaps (``refine_mask``) on the script's masks.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_hf import EVAL, TRAIN, _cli, _cos, _embed  # noqa: E402
from bench_quantize import _print  # noqa: E402
from bench_runtime import THREADS, minilm  # noqa: E402

import infercomp  # noqa: E402
from infercomp.kernels import cpu_features, cpu_model  # noqa: E402
from infercomp.models import sentence_embedding_recipe  # noqa: E402
from infercomp.prune.wanda import refine_mask  # noqa: E402

SPARSITY = 0.5
SLOPES = (-0.1, -0.075, -0.05, -0.025, 0.0, 0.025, 0.05)  # sparsity change per layer of depth

Score = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _stats(
    model: torch.nn.Module, linears: dict[str, torch.nn.Linear], enc: dict[str, torch.Tensor], keep_tokens: torch.Tensor
) -> dict[str, dict[str, torch.Tensor]]:
    """Per Linear, over the selected tokens of ``enc``: sum of x², sum of |x|, mean and covariance
    of the input features (float64)."""
    acc: dict[str, list[Any]] = {}

    def hook(name: str) -> Any:
        def fn(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()[keep_tokens]
            a = acc.setdefault(name, [0, 0, 0, 0, 0])
            a[0] = a[0] + x.pow(2).sum(0)
            a[1] = a[1] + x.abs().sum(0)
            a[2] = a[2] + x.sum(0)
            a[3] = a[3] + x.T @ x
            a[4] += x.shape[0]

        return fn

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.inference_mode():
        model(enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in hooks:
        h.remove()
    out = {}
    for n, (sq, ab, s, xx, count) in acc.items():
        mean = s / count
        out[n] = {"norm": sq.sqrt(), "l1": ab, "mean": mean, "cov": xx / count - torch.outer(mean, mean)}
    return out


def _wanda(w: torch.Tensor, st: dict[str, torch.Tensor], a: float = 1.0) -> torch.Tensor:
    return w.abs() * st["norm"][None] ** a


def _ria(w: torch.Tensor, st: dict[str, torch.Tensor]) -> torch.Tensor:
    """RIA (Zhang et al., 2024): |W| relative to its row's and its column's sums, times ||x||^0.5."""
    m = w.abs()
    return (m / m.sum(1, keepdim=True) + m / m.sum(0, keepdim=True)) * st["norm"][None] ** 0.5


class Study:
    def __init__(self, src: Path, transformers: Any) -> None:
        self.src, self.transformers = src, transformers
        self.recipe = sentence_embedding_recipe(src)
        tok = transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        self.train = tok(TRAIN, padding="longest", return_tensors="pt")
        self.eval = tok(EVAL, padding="longest", return_tensors="pt")
        base = self.fresh()
        self.ref = {"eval": _embed(base, self.eval, self.recipe), "train": _embed(base, self.train, self.recipe)}
        real = self.train["attention_mask"].bool()
        ids = self.train["input_ids"]
        self.real, self.words = real, real & (ids != tok.cls_token_id) & (ids != tok.sep_token_id)

    def fresh(self) -> torch.nn.Module:
        return self.transformers.AutoModel.from_pretrained(str(self.src), local_files_only=True).eval()

    def score(self, model: torch.nn.Module, split: str = "eval") -> tuple[float, float]:
        return _cos(_embed(model, getattr(self, split), self.recipe), self.ref[split])

    def pruned(
        self,
        score: Score = _wanda,
        correct: str = "none",
        slope: float = 0.0,
        tokens: torch.Tensor | None = None,
        swaps: bool = False,
    ) -> torch.nn.Module:
        """Wanda-shaped masks (``round(in * s)`` lowest scores of each row) on every Linear but the
        pooler; s = 50 % + slope * (layer - 2.5), so 50 % overall. ``correct``: ``bias`` adds
        (W ⊙ ¬mask)·E[x] to the bias; ``affine`` also scales each kept row by the least-squares
        factor Cov(y, y') / Var(y') of the dense output y on the pruned one y'. ``swaps``: the
        masks refined as the CLI does by default (``refine_mask`` on E[x xᵀ])."""
        model = self.fresh()
        linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and "pooler" not in n}
        stats = _stats(model, linears, self.train, self.real if tokens is None else tokens)
        with torch.no_grad():
            for name, lin in linears.items():
                st = stats[name]
                w = lin.weight.double()
                s = SPARSITY + slope * (int(re.search(r"layer\.(\d+)\.", name).group(1)) - 2.5)
                k = round(w.shape[1] * s)
                keep = torch.ones_like(w, dtype=torch.bool)
                keep.scatter_(1, score(w, st).argsort(dim=1)[:, :k], False)
                if swaps:
                    keep = refine_mask(w, keep, st["cov"] + torch.outer(st["mean"], st["mean"])).mask
                kept, bias = w * keep, lin.bias.double()
                if correct == "affine":
                    scale = ((w @ st["cov"]) * kept).sum(1) / ((kept @ st["cov"]) * kept).sum(1).clamp_min(1e-12)
                    bias = bias + w @ st["mean"] - scale * (kept @ st["mean"])
                    kept = kept * scale[:, None]
                elif correct == "bias":
                    bias = bias + (w - kept) @ st["mean"]
                lin.weight.copy_(kept.float())
                lin.bias.copy_(bias.float())
        return model


def main() -> None:
    torch.set_num_threads(THREADS)
    print(f"CPU: {cpu_model()}; features: {', '.join(cpu_features()) or '-'}; torch {torch.__version__}; threads {THREADS}")
    found = minilm()
    if found is None:
        return
    study = Study(*found)
    rows: list[list[str]] = []

    def row(label: str, cos: tuple[float, float]) -> None:
        rows.append([label, f"{cos[0]:.4f}", f"{cos[1]:.4f}"])
        print(f"  {label}: {cos[0]:.4f}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp, "train.txt")
        train.write_text("\n".join(TRAIN) + "\n")
        for i, (label, extra) in enumerate(
            [
                ("CLI --method wanda (masks refined, the default)", ["--method", "wanda"]),
                ("CLI --method wanda --no-refine (the paper's masks)", ["--method", "wanda", "--no-refine"]),
                ("CLI --method wanda --bias-correction", ["--method", "wanda", "--bias-correction"]),
                ("CLI --method sparsegpt (weight update)", ["--method", "sparsegpt"]),
            ]
        ):
            out = Path(tmp, f"out{i}.safetensors")
            _cli("prune", str(study.src), "-o", str(out), *extra, "--sparsity", str(SPARSITY), "--data", str(train))
            row(label, study.score(infercomp.load(out, compute="fp32")))
    row("wanda |W|·||x|| (this script)", study.score(study.pruned()))
    row("  + mask swaps (refine_mask, the CLI's default)", study.score(study.pruned(swaps=True)))
    row("  score |W|·||x||^0.5", study.score(study.pruned(lambda w, st: _wanda(w, st, 0.5))))
    row("  score |W|·||x||^2", study.score(study.pruned(lambda w, st: _wanda(w, st, 2.0))))
    row("  score |W|·mean|x|", study.score(study.pruned(lambda w, st: w.abs() * st["l1"][None])))
    row("  score RIA (relative |W|, ||x||^0.5)", study.score(study.pruned(_ria)))
    row("  norms without [CLS] / [SEP]", study.score(study.pruned(tokens=study.words)))
    row("  + bias shift", study.score(study.pruned(correct="bias")))
    row("  + per-row least-squares scale and shift", study.score(study.pruned(correct="affine")))
    for correct, label in [("bias", "bias shift"), ("affine", "scale and shift")]:
        on_train = {s: study.score(study.pruned(correct=correct, slope=s), "train")[0] for s in SLOPES}
        best = max(on_train, key=on_train.__getitem__)
        row(f"  + {label}, depth slope {best:+g} (best of {len(SLOPES)} on TRAIN)", study.score(study.pruned(correct=correct, slope=best)))
    title = f"all-MiniLM-L6-v2, {len(TRAIN)} calibration / {len(EVAL)} held-out sentences, {SPARSITY:.0%} of every Linear but the pooler"
    _print(title, ["variant", "cos mean", "cos min"], rows)


if __name__ == "__main__":
    main()
