"""Rendering a Comparison: rich table, JSON, Markdown, CSV. The only module that imports rich
besides the CLI's progress display."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from infercomp.measure import Comparison, ModelReport

FORMATS = ("table", "json", "markdown", "csv")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


COLUMNS = (
    "model",
    "size",
    "size x",
    "params",
    "sparsity",
    "bits/w",
    "latency ms (p50 / p90)",
    "latency x",
    "samples/s",
    "accuracy",
    "acc drop",
    "top-1 agree",
    "cos mean / min",
    "weights in RAM",
    "perplexity",  # added later: appended, so that Markdown columns keep their place
    "peak memory",  # --memory; appended likewise
)


def _cells(m: ModelReport) -> list[str]:
    lat = "-" if m.latency_ms is None else f"{m.latency_ms['median']:.3f} / {m.latency_ms['p90']:.3f}"
    fid = m.fidelity or {}
    drop = "-" if m.accuracy_drop is None else f"{100 * m.accuracy_drop:+.2f} pt"
    cos = "-" if not fid else f"{fid['cosine_mean']:.4f} / {fid['cosine_min']:.4f}"
    return [
        m.path,
        _size(m.size_bytes),
        _x(m.ratios.get("size")),
        _count(m.parameters),
        _pct(m.sparsity),
        "-" if m.bits_per_weight is None else f"{m.bits_per_weight:.2f}",
        lat,
        _x(m.ratios.get("latency")),
        "-" if m.throughput_per_s is None else f"{m.throughput_per_s:,.0f}",
        _pct(m.accuracy, 2),
        drop,
        _pct(fid.get("top1_agreement"), 2) if fid else "-",
        cos,
        _size(m.weight_memory_bytes),
        "-" if m.perplexity is None else f"{m.perplexity:,.3f}",
        _size(m.peak_memory_bytes),
    ]


def _settings_line(c: Comparison) -> str:
    s = c.settings
    features = ", ".join(s.get("cpu_features") or []) or "-"
    return (
        f"device {s['device']}, {s['threads']} thread(s), batch {s['batch_size']}, data {s.get('data') or '-'}, torch {s['torch']}, "
        f"compute {s.get('compute', 'fp32')} (CPU features: {features})" + (f", allocator: {s['allocator']}" if s.get("allocator") else "")
    )


def _compute_line(m: ModelReport) -> str | None:
    """``runs bf16 (auto: fp32 12.3 ms, bf16 4.1 ms)`` for a model's compute choice."""
    c = m.compute
    if not c:
        return None
    how = " (auto: nothing else to try for this storage on this CPU)" if c["requested"] == "auto" else ""
    if c.get("trial_ms"):
        trial = ", ".join(f"{k} {v:.3g} ms" for k, v in c["trial_ms"].items())
        how = f" ({c['requested']} chose it: {trial}{', cached' if c.get('cached') else ''})"
    return f"runs {c['mode']}{' under torch.compile' if c.get('compiled') else ''}{how}"


# The default table: what a person decides on. ``--columns all`` shows every column of COLUMNS.
DEFAULT_COLUMNS = ("model", "size", "size x", "latency ms (p50 / p90)", "latency x", "accuracy", "acc drop", "cos mean / min")
_PADDING = 3  # a column's borders and padding in rich's default box


def parse_columns(text: str | None) -> tuple[str, ...]:
    """``--columns``: ``all``, or a comma-separated list of column names (the model is always first)."""
    if text is None:
        return DEFAULT_COLUMNS
    if text.strip() == "all":
        return COLUMNS
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in COLUMNS]
    if unknown or not names:
        raise ValueError(
            f"--columns {text!r}: unknown column {unknown[0] if unknown else '(none)'!r}; choose from: {', '.join(COLUMNS)}, or all"
        )
    return ("model", *[n for n in names if n != "model"])


def shorten_left(text: str, width: int) -> str:
    """``…/cnn_int8.safetensors``: keep the end of a path, whole file name first (it tells the
    models apart); when even the name is too long, drop the ``.safetensors`` all names share."""
    if len(text) <= width:
        return text
    name = Path(text).name
    if len(name) > width and name.endswith(".safetensors"):
        return shorten_left(text.removesuffix(".safetensors"), width)
    tail = "…" + text[len(text) - width + 1 :]
    return tail if name in tail or len(name) > width else name


def _for_models(c: Comparison, columns: tuple[str, ...]) -> tuple[str, ...]:
    """The default columns, with perplexity for language models and peak memory where --memory
    measured it, and without accuracy for models that have none (language models, sentence
    embeddings: not classifiers)."""
    if columns != DEFAULT_COLUMNS:
        return columns
    accuracy = any(m.accuracy is not None for m in c.models)
    no_accuracy = not accuracy and any(m.task in ("causal-lm", "sentence-embedding") for m in c.models)
    out = [col for col in columns if not no_accuracy or col not in ("accuracy", "acc drop")]
    if any(m.perplexity is not None for m in c.models):
        out.insert(out.index("cos mean / min"), "perplexity")
    if any(m.peak_memory_bytes is not None for m in c.models):
        out.append("peak memory")
    return tuple(out)


def render_table(c: Comparison, console: Console, columns: tuple[str, ...] = DEFAULT_COLUMNS) -> None:
    """The comparison as a table that fits ``console.width`` without cutting a number: long paths
    are shortened from the left; when the chosen columns still do not fit, the table turns (one
    row per figure, one column per model)."""
    columns = _for_models(c, columns)
    index = [COLUMNS.index(col) for col in columns]
    rows = [[_cells(m)[i] for i in index] for m in c.models]
    figures = [max(len(col), *(len(r[j]) for r in rows)) + _PADDING for j, col in enumerate(columns) if j > 0]
    room = console.width - 1 - sum(figures) - _PADDING  # what is left for the model column
    longest = max(len(r[0]) for r in rows)
    if room >= min(longest, 24):
        table = Table(title="infercomp comparison (first row = baseline)", caption=_settings_line(c), caption_justify="left")
        for col in columns:
            table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
        for r in rows:
            table.add_row(shorten_left(r[0], room), *r[1:])
    else:
        table = _turned(c, columns, rows, console.width)
    console.print(table)
    if c.sensitivity:
        _render_sensitivity(c.sensitivity, console)
    for m in c.models:
        line = _compute_line(m)
        if line:
            console.print(f"{m.path}: {line}", markup=False, highlight=False)
        for note in m.notes:
            console.print(f"note: {m.path}: {note}", markup=False, highlight=False)
        if m.layers:
            _render_layers(m, console)


def _turned(c: Comparison, columns: tuple[str, ...], rows: list[list[str]], width: int) -> Table:
    """One row per figure, one column per model (headed by the shortened path). Where a model's
    column is narrower than a figure, the figure wraps at its spaces ("20.291 /" over "27.968")
    rather than lose digits to "…"."""
    label = max(len(col) for col in columns[1:])
    # rich's default box: one space of padding either side of each column, a border between
    # columns and at both edges.
    borders = 3 * (1 + len(rows)) + 1
    if (width - label - borders) // max(1, len(rows)) < 9:  # too narrow for "20.291 /": labels wrap first
        label = min(label, 14)
    per_model = max(6, (width - label - borders) // max(1, len(rows)))
    table = Table(title="infercomp comparison (first column = baseline)", caption=_settings_line(c), caption_justify="left")
    table.add_column("", justify="left", width=label)
    for r in rows:
        table.add_column(shorten_left(r[0], per_model), justify="right", max_width=per_model, overflow="fold")
    for j, col in enumerate(columns[1:], start=1):
        table.add_row(col, *(r[j] for r in rows))
    return table


_SENSITIVITY_COLUMNS = ("layer", "drop", "cos mean")


def _sensitivity_rows(s: dict[str, Any]) -> tuple[str, list[list[str]], str, str]:
    """(title, one row per layer, the verdict, the suggested --exclude flags or "") of a
    --sensitivity result."""
    title = f"sensitivity: {s['spec']} on one layer at a time ({s['metric'].replace('_', ' ')})"
    rows = []
    for row in s["layers"]:
        drop = "-" if row["drop"] is None else f"{100 * row['drop']:+.2f} pt"
        rows.append([row["name"], drop, "-" if row["cosine_mean"] is None else f"{row['cosine_mean']:.4f}"])
    budget = f"{100 * s['max_drop']:.2f} pt"
    flags = ""
    if s["drop_with_exclude"] is None:
        verdict = f"no exclude list keeps the drop within {budget}: leave this model uncompressed"
    elif not s["suggested_exclude"]:
        verdict = f"all layers together drop {100 * s['drop_all']:+.2f} pt, within {budget}: nothing to exclude"
    else:
        flags = " ".join(f"--exclude {n}" for n in s["suggested_exclude"])
        verdict = (
            f"suggested (measured: {100 * s['drop_with_exclude']:+.2f} pt, all layers {100 * s['drop_all']:+.2f} pt, budget {budget}):"
        )
    return title, rows, verdict, flags


def _render_sensitivity(s: dict[str, Any], console: Console) -> None:
    title, rows, verdict, flags = _sensitivity_rows(s)
    t = Table(title=title)
    for col in _SENSITIVITY_COLUMNS:
        t.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    console.print(t)
    console.print(f"{verdict} {flags}".rstrip(), markup=False, highlight=False)


_LAYER_COLUMNS = ("tensor", "shape", "stored", "bytes", "sparsity", "SQNR dB", "kernel")


def _layer_rows(m: ModelReport) -> list[list[str]]:
    rows = []
    for row in m.layers or []:
        db = "exact" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}"
        shape = "x".join(map(str, row["shape"]))
        rows.append([row["name"], shape, row["stored"], _size(row["bytes"]), _pct(row["sparsity"]), db, row.get("kernel") or "-"])
    return rows


def _render_layers(m: ModelReport, console: Console) -> None:
    """One row per tensor. Where the table would not fit the terminal, each tensor takes two
    lines instead, its whole name over its figures, so that names and figures stay whole."""
    rows = _layer_rows(m)
    widths = [max(len(col), *(len(r[i]) for r in rows)) if rows else len(col) for i, col in enumerate(_LAYER_COLUMNS)]
    title = f"layers of {m.path}"
    if sum(widths) + _PADDING * len(widths) + 1 <= console.width:
        t = Table(title=title)
        for col in _LAYER_COLUMNS:
            t.add_column(col, justify="left" if col in ("tensor", "stored", "kernel") else "right", no_wrap=True)
        for r in rows:
            t.add_row(*r)
        console.print(t)
        return

    def line(cells: list[str]) -> str:
        out = [f"{c:>{w}}" if i in (1, 3, 4, 5) else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths), start=1)]
        return "    " + "  ".join(out).rstrip()

    widths = widths[1:]
    console.print(title, markup=False, highlight=False)
    console.print("tensor", markup=False, highlight=False)
    console.print(line(list(_LAYER_COLUMNS[1:])), markup=False, highlight=False)
    for r in rows:
        console.print(r[0], markup=False, highlight=False, overflow="fold")
        console.print(line(r[1:]), markup=False, highlight=False, overflow="fold")


def to_json(c: Comparison) -> str:
    """The ``infercomp.report/1`` document. NaN and infinities (a model that outputs NaN) become
    null with a note, since bare ``NaN`` is not JSON and breaks strict parsers."""
    doc = c.to_dict()
    for m in doc["models"]:
        bad = _nonfinite_to_null(m, "")
        if bad:
            m["notes"].append(f"not finite, written as null: {', '.join(bad)}")
    return json.dumps(doc, indent=2, allow_nan=False)


def _nonfinite_to_null(d: dict[str, Any] | list[Any], prefix: str) -> list[str]:
    """Replace float NaN / inf in ``d`` (nested) by None, in place; return the keys replaced."""
    bad = []
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in list(items):
        if isinstance(v, float) and not math.isfinite(v):
            d[k] = None
            bad.append(f"{prefix}{k}")
        elif isinstance(v, (dict, list)) and k != "notes":
            bad += _nonfinite_to_null(v, f"{prefix}{k}.")
    return bad


def to_markdown(c: Comparison, columns: tuple[str, ...] | None = None) -> str:
    chosen = COLUMNS if columns is None else columns
    index = [COLUMNS.index(col) for col in chosen]
    lines = _markdown_table(chosen, [[_cells(m)[i] for i in index] for m in c.models])
    lines.append("")
    lines.append(f"_{_settings_line(c)}_")
    runs = [f"- `{m.path}`: {line}" for m in c.models if (line := _compute_line(m))]
    if runs:
        lines += ["", *runs]
    if c.sensitivity:
        title, rows, verdict, flags = _sensitivity_rows(c.sensitivity)
        lines += ["", f"**{title}**", "", *_markdown_table(_SENSITIVITY_COLUMNS, rows), "", verdict + (f" `{flags}`" if flags else "")]
    for m in c.models:
        if m.layers:
            lines += ["", f"**layers of `{m.path}`**", "", *_markdown_table(_LAYER_COLUMNS, _layer_rows(m))]
    return "\n".join(lines) + "\n"


def _markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    head = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    return head + ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]


CSV_FIELDS = (
    "path",
    "size_bytes",
    "parameters",
    "nonzero",
    "sparsity",
    "bits_per_weight",
    "latency_median_ms",
    "latency_p90_ms",
    "throughput_per_s",
    "peak_memory_bytes",
    "accuracy",
    "accuracy_drop",
    "top1_agreement",
    "cosine_mean",
    "cosine_min",
    "size_ratio",
    "parameters_ratio",
    "latency_ratio",
    "weight_memory_bytes",  # added later: appended, so that columns read by position keep their place
    "perplexity",
)


def to_csv(c: Comparison) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for m in c.models:
        derived: dict[str, Any] = {
            "latency_median_ms": (m.latency_ms or {}).get("median"),
            "latency_p90_ms": (m.latency_ms or {}).get("p90"),
            **{k: (m.fidelity or {}).get(k) for k in ("top1_agreement", "cosine_mean", "cosine_min")},
            **{f"{k}_ratio": m.ratios.get(k) for k in ("size", "parameters", "latency")},
        }
        row = [derived[f] if f in derived else getattr(m, f) for f in CSV_FIELDS]
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def render_text(c: Comparison, fmt: str, columns: tuple[str, ...] | None = None) -> str:
    """JSON / Markdown / CSV text (the table is drawn by ``render_table``). ``columns``
    (``--columns``): the Markdown table's, when chosen; JSON and CSV always hold every figure."""
    if fmt == "markdown":
        return to_markdown(c, columns)
    return {"json": to_json, "csv": to_csv}[fmt](c)
