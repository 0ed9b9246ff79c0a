"""render.py: a Comparison as a rich table, JSON, Markdown and CSV; missing numbers shown as missing."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from infercomp import api, render
from infercomp.errors import UsageError
from infercomp.measure import Comparison, ModelReport
from tests.conftest import DIGITS_TEST, SAMPLE, invoke

SETTINGS = {"device": "cpu", "threads": 2, "batch_size": 32, "data": "d.safetensors", "torch": "2.x"}


def _comparison() -> Comparison:
    """A measured baseline and a pruned model with a per-layer view; a third model measured nothing."""
    base = ModelReport(
        path="base.safetensors", size_bytes=2048, parameters=1000, nonzero=1000, sparsity=0.0, bits_per_weight=32.0,
        latency_ms={"median": 2.0, "p90": 2.5, "runs": 10}, throughput_per_s=16000.0, accuracy=0.99,
        fidelity={"top1_agreement": 1.0, "cosine_mean": 1.0, "cosine_min": 1.0, "kl_div": 0.0},
        ratios={"size": 1.0, "parameters": 1.0, "latency": 1.0}, accuracy_drop=0.0,
    )  # fmt: skip
    pruned = ModelReport(
        path="a|b.safetensors", size_bytes=3 * 1024 * 1024, parameters=1000, nonzero=400, sparsity=0.6, bits_per_weight=12.5,
        latency_ms={"median": 1.0, "p90": 1.25, "runs": 12}, throughput_per_s=32000.0, accuracy=0.97,
        fidelity={"top1_agreement": 0.985, "cosine_mean": 0.99876, "cosine_min": 0.9, "kl_div": 0.01},
        ratios={"size": 0.5, "parameters": 1.0, "latency": 0.5}, accuracy_drop=0.02, notes=["something to know"],
        layers=[
            {"name": "fc.weight", "shape": [8, 4], "stored": "sparse-bitmask", "bytes": 100, "sparsity": 0.6, "sqnr_db": 12.345},
            {"name": "fc2.weight", "shape": [3, 8], "stored": "float32", "bytes": 96, "sparsity": 0.0, "sqnr_db": None},
        ],
    )  # fmt: skip
    bare = ModelReport(path="bare.pt", size_bytes=64, parameters=16, ratios={"size": 0.03125, "parameters": 0.016, "latency": None})
    return Comparison(settings=SETTINGS, models=[base, pruned, bare])


def test_json_is_the_schema_dict() -> None:
    c = _comparison()
    d = json.loads(render.to_json(c))
    assert d == json.loads(json.dumps(c.to_dict())) and d["schema"] == "infercomp.report/1"
    assert [m["path"] for m in d["models"]] == ["base.safetensors", "a|b.safetensors", "bare.pt"]
    assert "layers" not in d["models"][0] and len(d["models"][1]["layers"]) == 2  # no per-layer view: no key
    assert d["models"][2]["latency_ms"] is None and d["models"][2]["accuracy"] is None  # null, never made up


def test_markdown_has_one_row_per_model_and_escapes_pipes() -> None:
    lines = render.to_markdown(_comparison()).splitlines()
    assert lines[0] == "| " + " | ".join(render.COLUMNS) + " |"
    assert lines[1].count("---") == len(render.COLUMNS)
    rows = [line for line in lines[2 : lines.index("")] if line.startswith("| ")]  # the models table
    assert len(rows) == 3 and rows[1].startswith("| a\\|b.safetensors | 3.0 MiB | 0.50x | 1,000 | 60.0% | 12.50 | 1.000 / 1.250 | 0.50x |")
    assert "| 97.00% | +2.00 pt | 98.50% | 0.9988 / 0.9000 |" in rows[1]
    assert rows[2].split(" | ")[render.COLUMNS.index("latency ms (p50 / p90)")] == "-"
    settings = lines[lines.index("") + 1]  # after the models table
    assert settings.startswith("_device cpu, 2 thread(s), batch 32, data d.safetensors, torch 2.x") and settings.endswith("_")


def test_csv_has_the_fields_and_empty_cells_for_missing_numbers() -> None:
    rows = list(csv.DictReader(io.StringIO(render.to_csv(_comparison()))))
    assert list(rows[0]) == list(render.CSV_FIELDS) and len(rows) == 3
    p = rows[1]
    assert (p["path"], p["size_bytes"], p["nonzero"], p["latency_median_ms"], p["latency_p90_ms"]) == (
        "a|b.safetensors",
        "3145728",
        "400",
        "1.0",
        "1.25",
    )
    assert (p["top1_agreement"], p["cosine_min"], p["size_ratio"], p["latency_ratio"], p["accuracy_drop"]) == (
        "0.985",
        "0.9",
        "0.5",
        "0.5",
        "0.02",
    )
    assert rows[2]["latency_median_ms"] == "" and rows[2]["accuracy"] == "" and rows[2]["latency_ratio"] == ""


def test_table_shows_every_model_its_notes_and_layers() -> None:
    console = Console(record=True, width=400, color_system=None)
    render.render_table(_comparison(), console)
    text = console.export_text()
    for cell in (
        "base.safetensors",
        "a|b.safetensors",
        "bare.pt",
        "2.0 KiB",
        "3.0 MiB",
        "64 B",
        "0.50x",
        "97.00%",
        "+2.00 pt",
        "0.9988 / 0.9000",
    ):
        assert cell in text, cell
    assert "note: a|b.safetensors: something to know" in text
    assert "layers of a|b.safetensors" in text and "layers of base.safetensors" not in text
    fc, fc2 = (next(line for line in text.splitlines() if f" {name} " in line) for name in ("fc.weight", "fc2.weight"))
    assert "8x4" in fc and "sparse-bitmask" in fc and "60.0%" in fc and "12.3" in fc
    assert "exact" in fc2  # identical to the baseline: no finite SQNR
    assert "device cpu, 2 thread(s), batch 32" in text


def test_peak_memory_is_a_column_where_it_was_measured() -> None:
    """--memory measures it: the default table then shows it (and Markdown always has the column)."""
    c = _comparison()
    plain = Console(record=True, width=400, color_system=None)
    render.render_table(c, plain)
    assert "peak memory" not in plain.export_text()
    c.models[0].peak_memory_bytes, c.models[1].peak_memory_bytes = 20 * 1024 * 1024, 17 * 1024 * 1024
    console = Console(record=True, width=400, color_system=None)
    render.render_table(c, console)
    text = console.export_text()
    assert "peak memory" in text and "20.0 MiB" in text and "17.0 MiB" in text
    rows = [line for line in render.to_markdown(c).splitlines() if line.startswith("| a")]
    assert rows[0].split(" | ")[render.COLUMNS.index("peak memory")].rstrip(" |") == "17.0 MiB"


@pytest.mark.parametrize(("fmt", "fn"), [("json", render.to_json), ("markdown", render.to_markdown), ("csv", render.to_csv)])
def test_render_text_dispatches(fmt: str, fn) -> None:
    c = _comparison()
    assert render.render_text(c, fmt) == fn(c)
    assert set(render.FORMATS) == {"table", "json", "markdown", "csv"}


def test_render_handles_missing_numbers() -> None:
    c = api.report([SAMPLE["mlp"]], latency=False)
    row = render.to_markdown(c).splitlines()[2].split(" | ")
    latency_col = render.COLUMNS.index("latency ms (p50 / p90)")
    assert row[latency_col] == "-"  # not measured: shown as a dash, not a number
    assert json.loads(render.to_json(c))["models"][0]["latency_ms"] is None


@pytest.mark.parametrize("width", [80, 90, 100, 200])
@pytest.mark.parametrize("columns", [None, "all", "size x,latency x,accuracy"])
@pytest.mark.parametrize("models", [3, 5])
def test_every_number_appears_whole_at_any_width(width: int, columns: str | None, models: int) -> None:
    """A table nobody can read is a bug: whatever the terminal width and however many models, no
    line is wider than it and every figure of the chosen columns is printed whole (the table
    turns when it must; a figure pair such as "p50 / p90" may then take two lines, never "…")."""
    c = _comparison()
    c.models[1].path = "some/rather/long/folder/name/where/the/output/went/a|b.safetensors"
    for i in range(3, models):  # report's usual figures: five digits of latency, four of cosine
        extra = copy.deepcopy(c.models[1])
        extra.path = f"out/cnn_variant{i}.safetensors"
        extra.latency_ms = {"median": 20.291 + i, "p90": 27.968 + i, "runs": 40}
        extra.fidelity = {"top1_agreement": 0.5, "cosine_mean": 0.1152, "cosine_min": -0.4738, "kl_div": 1.5}
        c.models.append(extra)
    console = Console(record=True, width=width, color_system=None)
    chosen = render.parse_columns(columns)
    render.render_table(c, console, chosen)
    text = console.export_text()
    table = text.split("device ")[0]  # the table itself, before the settings caption
    assert max(len(line) for line in table.splitlines()) <= width
    body = table.split("┡")[1]
    words = body.split()
    for m in c.models:
        cells = render._cells(m)
        for col in chosen[1:]:
            cell = cells[render.COLUMNS.index(col)]
            assert cell in table or all(w in words for w in cell.split()), (col, cell, width)
    if "first column = baseline" in table:  # turned: the model names are above the figures
        assert "…" not in body, body
    assert "a|b" in table  # long paths keep their file name (shortened from the left)


def test_columns_option_is_checked() -> None:
    assert render.parse_columns(None) == render.DEFAULT_COLUMNS
    assert render.parse_columns("all") == render.COLUMNS
    assert render.parse_columns("accuracy, size") == ("model", "accuracy", "size")
    with pytest.raises(ValueError, match="unknown column 'speed'"):
        render.parse_columns("speed")
    assert render.shorten_left("a/b/c/model_int8.safetensors", 25) == "…c/model_int8.safetensors"
    assert render.shorten_left("a/b/c/model_int8.safetensors", 12) == "…/model_int8"  # the shared suffix goes first


def test_plot_draws_png_and_svg(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from infercomp import plot

    c = _comparison()
    for name in ("t.png", "t.svg"):
        out = tmp_path / name
        plot.plot(c, out)
        head = out.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if name.endswith(".png") else b"<svg" in out.read_bytes()[:2000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png", "t.svg"]  # nothing else left behind
    with pytest.raises(UsageError, match="give a .png or .svg path"):
        plot.plot(c, tmp_path / "t.pdf")


def test_plot_flag_through_the_cli(runner, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "trade.png"
    r = invoke(runner, "report", SAMPLE["mlp"], SAMPLE["cnn"], "--data", DIGITS_TEST, "--no-latency", "--layers", "--plot", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    r = invoke(runner, "report", SAMPLE["mlp"], "--no-latency", "--plot", tmp_path / "trade.jpg")
    assert r.exit_code == 2 and "give a .png or .svg path" in r.stderr


@pytest.mark.parametrize("width", [80, 100, 200])
def test_layer_view_keeps_names_and_figures_whole_at_any_width(width: int) -> None:
    """--layers on a transformer: names of 45 characters and six figure columns do not fit 80
    columns as one table row; each tensor then takes two lines, name over figures, nothing cut."""
    c = _comparison()
    long = "encoder.layer.11.attention.self.query.weight"
    c.models[1].layers[0]["name"] = long
    c.models[1].layers[1]["stored"] = "pack-quantized"
    c.models[1].layers[1]["kernel"] = "fp32 linear"
    console = Console(record=True, width=width, color_system=None)
    render.render_table(c, console)
    view = console.export_text().split("layers of a|b.safetensors")[1]
    assert max(len(line) for line in view.splitlines()) <= width
    lines = [line.strip(" │") for line in view.splitlines()]
    assert any(line.startswith(long) for line in lines)  # the whole name, on one line
    assert "…" not in view
    for figure in ("8x4", "sparse-bitmask", "100 B", "60.0%", "12.3", "pack-quantized", "fp32 linear", "exact"):
        assert figure in view, (figure, width)
    assert ("┃ tensor" in view) == (width == 200)  # the one-row table where it fits (117 columns)


def test_markdown_carries_the_layer_view_and_the_sensitivity_ranking() -> None:
    """--layers and --sensitivity are in the Markdown a CI job posts, not only on the terminal."""
    c = _comparison()
    c.sensitivity = {
        "spec": "quantize:int4", "metric": "accuracy_drop", "max_drop": 0.005, "drop_all": 0.03, "drop_with_exclude": 0.002,
        "suggested_exclude": ["fc1"], "layers": [{"name": "fc1", "drop": 0.02, "cosine_mean": 0.97}, {"name": "fc2", "drop": None, "cosine_mean": None}],
    }  # fmt: skip
    text = render.to_markdown(c)
    assert "**layers of `a|b.safetensors`**" in text and "| fc.weight | 8x4 | sparse-bitmask | 100 B | 60.0% | 12.3 | - |" in text
    assert "| fc1 | +2.00 pt | 0.9700 |" in text and "| fc2 | - | - |" in text
    assert "budget 0.50 pt): `--exclude fc1`" in text


def test_markdown_takes_the_chosen_columns() -> None:
    """--columns applied to the table only; Markdown printed all 16 columns whatever was asked."""
    c = _comparison()
    lines = render.render_text(c, "markdown", render.parse_columns("size,accuracy")).splitlines()
    assert lines[0] == "| model | size | accuracy |" and lines[3].startswith("| a\\|b.safetensors | 3.0 MiB | 97.00% |")
    assert render.render_text(c, "markdown").splitlines()[0] == "| " + " | ".join(render.COLUMNS) + " |"  # default: all
