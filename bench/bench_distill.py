"""Distillation benchmark: recover a 50 %-channel CNN, train a half-width student, KD vs fine-tuning.

    .venv/bin/python bench/bench_distill.py

Teacher: the digits CNN (sample_models/digits_cnn.safetensors). Training data: digits_train
(1437 images); every accuracy below is on digits_test (360 images), which no run sees while training
(no --val-data, so no model selection on the test set: the last epoch is what is scored).
Budget per run: 10 epochs, batch 64, AdamW lr 3e-3, T 4, seed 0, 2 torch threads.
The "pruned" student keeps each layer's half of the filters with the largest L1 norm (the
``infercomp prune --method channel`` output when that method exists, else built here the same way).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infercomp import checkpoint, measure, zoo  # noqa: E402
from infercomp.checkpoint import Checkpoint  # noqa: E402
from infercomp.data import load_data  # noqa: E402
from infercomp.distill import DistillConfig  # noqa: E402
from infercomp.models import ModelLoader  # noqa: E402
from infercomp.pipeline import MeasureOptions, run  # noqa: E402

SAMPLES = ROOT / "sample_models"
TRAIN, TEST = SAMPLES / "digits_train.safetensors", SAMPLES / "digits_test.safetensors"
THREADS, EPOCHS = 2, 10
HALF_CNN = {"channels": [16, 32, 64], "hidden": 64}
HALF_MLP = {"hidden": [128, 64]}


def test_accuracy(path: Path) -> float:
    module = ModelLoader().build(checkpoint.load(path))
    data = load_data(TEST)
    with torch.no_grad():
        return measure.accuracy(measure.predict(module, data, batch_size=256, device=torch.device("cpu")), data.labels)


def half_channels_by_l1(teacher_path: Path, out: Path) -> str:
    """A digits-cnn with half the channels of every layer, initialised from the teacher's filters
    with the largest L1 norm (structured channel pruning). Uses ``infercomp prune --method
    channel`` when it exists; returns which route was taken."""
    from infercomp import prune

    if "channel" in getattr(prune, "METHODS", ()):
        try:
            cfg = prune.PruneConfig(method="channel", sparsity=0.5)
            run(teacher_path, out, cfg, loader=ModelLoader(), options=MeasureOptions(latency=False), force=True)
            return "infercomp prune --method channel --sparsity 0.5"
        except Exception as e:  # report it, then fall back to the in-bench pruning
            print(f"(prune --method channel failed: {type(e).__name__}: {e}; using the bench's own L1 channel pruning)")
    t = checkpoint.load(teacher_path).tensors

    def top(w: torch.Tensor, k: int) -> torch.Tensor:
        return w.abs().flatten(1).sum(1).topk(k).indices.sort().values

    s: dict[str, torch.Tensor] = {}
    keep_in = torch.arange(1)
    for conv, bn in (("features.0", "features.1"), ("features.3", "features.4"), ("features.7", "features.8")):
        w = t[f"{conv}.weight"]
        keep = top(w, w.shape[0] // 2)
        s[f"{conv}.weight"] = w[keep][:, keep_in].clone()
        for name in ("weight", "bias", "running_mean", "running_var"):
            s[f"{bn}.{name}"] = t[f"{bn}.{name}"][keep].clone()
        s[f"{bn}.num_batches_tracked"] = t[f"{bn}.num_batches_tracked"].clone()
        keep_in = keep
    # classifier.1 reads the flattened (C, 2, 2) map: input feature c*4 + p for kept channel c.
    cols = (keep_in[:, None] * 4 + torch.arange(4)).flatten()
    w1 = t["classifier.1.weight"]
    rows = top(w1, w1.shape[0] // 2)
    s["classifier.1.weight"] = w1[rows][:, cols].clone()
    s["classifier.1.bias"] = t["classifier.1.bias"][rows].clone()
    s["classifier.3.weight"] = t["classifier.3.weight"][:, rows].clone()
    s["classifier.3.bias"] = t["classifier.3.bias"].clone()
    checkpoint.save(Checkpoint(tensors=s, model={"ref": "digits-cnn", "config": HALF_CNN}), out, force=True)
    return "half of each layer's filters by L1 norm (built in the bench)"


def distill(teacher: Path, out: Path, **kw) -> tuple[float, float]:
    """Run the distill pipeline (no latency timing); (test accuracy, wall seconds of the run)."""
    cfg = DistillConfig(epochs=EPOCHS, seed=0, **kw)
    t0 = time.perf_counter()
    run(
        teacher,
        out,
        cfg,
        loader=ModelLoader(),
        options=MeasureOptions(latency=False, batch_size=64),
        data=TRAIN,
        eval_data=TEST,
        force=True,
    )
    wall = time.perf_counter() - t0
    return test_accuracy(out), wall


def main() -> None:
    torch.set_num_threads(THREADS)
    cnn, mlp = SAMPLES / "digits_cnn.safetensors", SAMPLES / "digits_mlp.safetensors"
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        acc_cnn, acc_mlp = test_accuracy(cnn), test_accuracy(mlp)
        route = half_channels_by_l1(cnn, d / "pruned.safetensors")
        acc_pruned = test_accuracy(d / "pruned.safetensors")
        kd_p, wall_p = distill(cnn, d / "kd_pruned.safetensors", student=str(d / "pruned.safetensors"))
        ft_p, wall_ft_p = distill(cnn, d / "ft_pruned.safetensors", student=str(d / "pruned.safetensors"), alpha=0.0)
        kd_h, wall_h = distill(cnn, d / "kd_half.safetensors", student_model="digits-cnn", student_config=HALF_CNN)
        ft_h, _ = distill(cnn, d / "ft_half.safetensors", student_model="digits-cnn", student_config=HALF_CNN, alpha=0.0)
        kd_m, _ = distill(mlp, d / "kd_mlp.safetensors", student_model="digits-mlp", student_config=HALF_MLP)
        ft_m, _ = distill(mlp, d / "ft_mlp.safetensors", student_model="digits-mlp", student_config=HALF_MLP, alpha=0.0)

    def pt(x: float) -> str:
        return f"{100 * x:.2f}%"

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    drop_p, drop_h = acc_cnn - kd_p, acc_cnn - kd_h
    kd_wins = [name for name, kd, ft in (("pruned CNN", kd_p, ft_p), ("half CNN", kd_h, ft_h), ("half MLP", kd_m, ft_m)) if kd > ft]
    rows += [
        ("teacher digits CNN (test acc)", pt(acc_cnn), "", ""),
        ("50%-channel CNN before distillation", pt(acc_pruned), "", ""),
        (
            f"50%-channel CNN + KD ({EPOCHS} ep)",
            f"{pt(kd_p)} (drop {100 * drop_p:+.2f} pt)",
            "drop <= 0.30 pt",
            verdict(drop_p <= 0.003 + 1e-9),
        ),
        ("  wall time of that distill run", f"{wall_p:.1f} s", "< 60 s", verdict(wall_p < 60)),
        (f"50%-channel CNN + plain fine-tuning ({EPOCHS} ep)", f"{pt(ft_p)} ({wall_ft_p:.1f} s)", "", ""),
        (
            f"half-width CNN from --student-model + KD ({EPOCHS} ep)",
            f"{pt(kd_h)} (drop {100 * drop_h:+.2f} pt)",
            "drop <= 1 pt",
            verdict(drop_h <= 0.01 + 1e-9),
        ),
        ("half-width CNN + plain fine-tuning", pt(ft_h), "", ""),
        ("teacher digits MLP (test acc)", pt(acc_mlp), "", ""),
        ("half-width MLP + KD / + plain fine-tuning", f"{pt(kd_m)} / {pt(ft_m)}", "", ""),
        ("KD beats fine-tuning (same student, same budget) on", ", ".join(kd_wins) or "none", "at least one", verdict(bool(kd_wins))),
    ]
    print(
        f"infercomp distill bench: torch {torch.__version__}, {THREADS} threads, batch 64, {EPOCHS} epochs, seed 0; pruned student: {route}"
    )
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    head = ("measure", "measured", "target", "")
    print("  ".join(h.ljust(w) for h, w in zip(head, width)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))


if __name__ == "__main__":
    main()
