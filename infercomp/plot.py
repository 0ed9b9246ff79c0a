"""``--plot FILE.png|.svg``: the trade-off of a comparison as a picture.

Top row: accuracy (or, without labels, output cosine against the baseline) against file size and
against latency, one labelled point per checkpoint, the baseline drawn as a star. With
``--layers``, a second row: per-layer SQNR against the baseline and per-layer sparsity, as bars,
one colour per compared checkpoint.

matplotlib is an optional extra (``pip install 'infercomp[plot]'``); it is imported only here,
when a plot is asked for.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

from infercomp.checkpoint import write_atomic
from infercomp.errors import UsageError
from infercomp.measure import Comparison, ModelReport

SUFFIXES = (".png", ".svg")


def check_path(path: Path) -> None:
    """Refuse a plot path we cannot write (the format comes from the suffix)."""
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--plot {path}: give a .png or .svg path")
    if importlib.util.find_spec("matplotlib") is None:  # said before any work, not after the output is written
        raise UsageError("--plot needs matplotlib: pip install 'infercomp[plot]'")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("--plot needs matplotlib: pip install 'infercomp[plot]'") from e
    return plt


def _quality(m: ModelReport) -> tuple[float | None, str]:
    """(value, axis label): accuracy when measured, else output cosine against the baseline."""
    if m.accuracy is not None:
        return 100 * m.accuracy, "accuracy (%)"
    if m.fidelity is not None:
        return m.fidelity["cosine_mean"], "output cosine vs baseline (mean)"
    return None, ""


def _label(path: str) -> str:
    return Path(path).name.removesuffix(".safetensors")


def plot(comparison: Comparison, path: Path) -> None:
    """Draw ``comparison`` to ``path`` (.png or .svg), written atomically."""
    check_path(path)
    plt = _pyplot()
    models = comparison.models
    layered = [m for m in models[1:] if m.layers]
    rows = 2 if layered else 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False)
    ylabel = next((_quality(m)[1] for m in models if _quality(m)[0] is not None), "")
    for ax, (xkey, xlabel) in zip(axes[0], (("size", "file size (KiB)"), ("latency", "latency per batch, median (ms)"))):
        drawn = 0
        for i, m in enumerate(models):
            y, _ = _quality(m)
            x = (None if m.size_bytes is None else m.size_bytes / 1024) if xkey == "size" else (m.latency_ms or {}).get("median")
            if x is None or y is None:
                continue
            ax.scatter([x], [y], marker="*" if i == 0 else "o", s=160 if i == 0 else 50, color="black" if i == 0 else f"C{i}", zorder=3)
            # Staggered offsets: checkpoints of one size or speed would otherwise print over each other.
            offset = (6, 6 - 11 * (i % 3))
            ax.annotate(_label(m.path) + (" (baseline)" if i == 0 else ""), (x, y), textcoords="offset points", xytext=offset, fontsize=8)
            drawn += 1
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"not measured ({'pass --data' if not ylabel else 'no ' + xkey})", ha="center", transform=ax.transAxes)
    if layered:
        _layer_bars(axes[1], layered)
    s = comparison.settings
    fig.suptitle(
        f"infercomp: {s.get('device', '?')}, {s.get('threads', '?')} thread(s), batch {s.get('batch_size', '?')}, compute {s.get('compute', '?')}",
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lower().lstrip("."), dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    write_atomic(path, lambda f: f.write(data), what="the plot")


def _layer_bars(axes: Any, models: list[ModelReport]) -> None:
    names = [row["name"].removesuffix(".weight") for row in models[0].layers or []]
    width = 0.8 / len(models)
    for ax, key, label in zip(axes, ("sqnr_db", "sparsity"), ("weight SQNR vs baseline (dB; exact = top)", "sparsity")):
        for k, m in enumerate(models):
            rows = {row["name"].removesuffix(".weight"): row for row in m.layers or []}
            top = max((r["sqnr_db"] or 0.0 for r in rows.values()), default=0.0) + 10
            values = []
            for n in names:
                v = rows.get(n, {}).get(key)
                values.append(top if key == "sqnr_db" and v is None and n in rows else (v or 0.0))
            ax.bar([i + k * width for i in range(len(names))], values, width, label=_label(m.path), color=f"C{k + 1}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
