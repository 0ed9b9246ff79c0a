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

from infercomp import checkpoint, measure  # noqa: E402
from infercomp.checkpoint import Checkpoint  # noqa: E402
from infercomp.data import load_data  # noqa: E402
from infercomp.distill import DistillConfig  # noqa: E402
from infercomp.measure import MeasureOptions  # noqa: E402
from infercomp.models import ModelLoader  # noqa: E402
from infercomp.pipeline import run  # noqa: E402

SAMPLES = ROOT / "sample_models"
TRAIN, TEST = SAMPLES / "digits_train.safetensors", SAMPLES / "digits_test.safetensors"
THREADS, EPOCHS = 2, 10
SEEDS = (0, 1, 2)
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


def distill(teacher: Path, out: Path, seed: int = 0, **kw) -> tuple[float, float]:
    """Run the distill pipeline (no latency timing); (test accuracy, wall seconds of the run)."""
    cfg = DistillConfig(epochs=EPOCHS, seed=seed, **kw)
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
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pruned = d / "pruned.safetensors"
        acc_cnn, acc_mlp = test_accuracy(cnn), test_accuracy(mlp)
        route = half_channels_by_l1(cnn, pruned)
        acc_pruned = test_accuracy(pruned)
        students = {
            "50%-channel CNN": (cnn, {"student": str(pruned)}),
            "half-width CNN (fresh)": (cnn, {"student_model": "digits-cnn", "student_config": HALF_CNN}),
            "half-width MLP (fresh)": (mlp, {"student_model": "digits-mlp", "student_config": HALF_MLP}),
        }
        # (student, alpha) -> [(test accuracy, wall s) per seed]; KD and fine-tuning interleaved per seed.
        results: dict[tuple[str, float], list[tuple[float, float]]] = {}
        for seed in SEEDS:
            for name, (teacher, kw) in students.items():
                for alpha in (0.9, 0.0):
                    results.setdefault((name, alpha), []).append(distill(teacher, d / "out.safetensors", seed, alpha=alpha, **kw))

    def pt(x: float) -> str:
        return f"{100 * x:.2f}%"

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    def accs(name: str, alpha: float) -> list[float]:
        return [a for a, _ in results[(name, alpha)]]

    kd_p, wall_p = results[("50%-channel CNN", 0.9)][0]  # seed 0: the default command
    kd_h, _ = results[("half-width CNN (fresh)", 0.9)][0]
    drop_p, drop_h = acc_cnn - kd_p, acc_cnn - kd_h
    rows: list[tuple[str, str, str, str]] = [
        ("teacher digits CNN / digits MLP (test acc)", f"{pt(acc_cnn)} / {pt(acc_mlp)}", "", ""),
        ("50%-channel CNN before distillation", pt(acc_pruned), "", ""),
        (
            f"50%-channel CNN + KD, {EPOCHS} ep, seed 0",
            f"{pt(kd_p)} (drop {100 * drop_p:+.2f} pt)",
            "drop <= 0.30 pt",
            verdict(drop_p <= 0.003 + 1e-9),
        ),
        ("  wall time of that distill run", f"{wall_p:.1f} s", "< 60 s", verdict(wall_p < 60)),
        (
            f"half-width CNN (--student-model) + KD, {EPOCHS} ep, seed 0",
            f"{pt(kd_h)} (drop {100 * drop_h:+.2f} pt)",
            "drop <= 1 pt",
            verdict(drop_h <= 0.01 + 1e-9),
        ),
    ]
    wins = []
    for name in students:
        kd, ft = accs(name, 0.9), accs(name, 0.0)
        mean_kd, mean_ft = sum(kd) / len(kd), sum(ft) / len(ft)
        if mean_kd > mean_ft:
            wins.append(name)
        per_seed = " ".join(f"{100 * a:.1f}/{100 * b:.1f}" for a, b in zip(kd, ft))
        rows.append((f"{name}: KD vs fine-tuning, mean of seeds {SEEDS}", f"{pt(mean_kd)} vs {pt(mean_ft)} ({per_seed})", "", ""))
    rows.append(("KD beats fine-tuning (same student, same budget) on", ", ".join(wins) or "none", "at least one", verdict(bool(wins))))
    print(
        f"infercomp distill bench: torch {torch.__version__}, {THREADS} threads, batch 64, {EPOCHS} epochs, T 4, alpha 0.9 (KD) / 0 (fine-tuning)"
    )
    print(f"pruned student: {route}; accuracies on digits_test (360 images), never seen in training")
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    head = ("measure", "measured", "target", "")
    print("  ".join(h.ljust(w) for h, w in zip(head, width)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())


if __name__ == "__main__":
    main()
