"""``infercomp report``: CliRunner and one real subprocess; numbers match the files and reality."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from infercomp import measure, pipeline
from infercomp.models import ModelLoader
from infercomp.prune import PruneConfig
from tests.conftest import DIGITS_TEST, KNOWN_ACCURACY, SAMPLE, invoke, one_line_error, run_cli

FAST = ("--min-time", "0.05", "--warmup", "1")


def test_json_schema_and_ratios_of_two_models(tmp_path: Path, runner) -> None:
    out = tmp_path / "pruned.safetensors"
    cmp = pipeline.run(
        SAMPLE["mlp"],
        out,
        PruneConfig(sparsity=0.5),
        loader=ModelLoader(),
        options=measure.MeasureOptions(latency=False),
        data=DIGITS_TEST,
    )
    r = invoke(runner, "report", SAMPLE["mlp"], out, "--data", DIGITS_TEST, "--format", "json", *FAST)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["schema"] == "infercomp.report/1"
    assert {"device", "threads", "batch_size", "data"} <= set(d["settings"])
    base, after = d["models"]
    for key in (
        "path",
        "size_bytes",
        "parameters",
        "nonzero",
        "sparsity",
        "bits_per_weight",
        "latency_ms",
        "throughput_per_s",
        "peak_memory_bytes",
        "accuracy",
        "fidelity",
        "ratios",
        "accuracy_drop",
    ):
        assert key in base and key in after
    assert after["size_bytes"] == out.stat().st_size
    assert after["ratios"]["size"] == pytest.approx(out.stat().st_size / SAMPLE["mlp"].stat().st_size)
    assert after["accuracy_drop"] == pytest.approx(base["accuracy"] - after["accuracy"])
    assert after["peak_memory_bytes"] is None  # not measured unless --memory: null, never made up
    assert after["accuracy"] == pytest.approx(cmp.models[1].accuracy)
    assert after["history"] == ["prune"]


def test_markdown_and_csv_and_report_out(tmp_path: Path, runner) -> None:
    md = tmp_path / "r.md"
    r = invoke(runner, "report", SAMPLE["mlp"], "--format", "csv", "--report-out", md, "--no-latency")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert rows[0]["path"] == str(SAMPLE["mlp"]) and rows[0]["latency_median_ms"] == ""
    assert md.read_text().startswith("| model |")
    j = tmp_path / "r.json"
    r = invoke(runner, "report", SAMPLE["mlp"], "--report-out", j, "--no-latency")
    assert r.exit_code == 0, r.output
    assert json.loads(j.read_text())["models"][0]["parameters"] > 0


def test_table_goes_to_stdout_and_names_settings(runner) -> None:
    r = invoke(runner, "report", SAMPLE["mlp"], "--data", DIGITS_TEST, *FAST)
    assert r.exit_code == 0, r.output
    assert "digits_mlp.safetensors" in r.stdout and "98.89%" in r.stdout and "thread" in r.stdout
    assert r.stderr == ""


def test_layers_view_shows_sqnr(runner, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    assert invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, "--no-latency").exit_code == 0
    r = invoke(runner, "report", SAMPLE["mlp"], out, "--layers", "--no-latency", "--format", "json")
    assert r.exit_code == 0, r.output
    base, quantized = (m["layers"] for m in json.loads(r.stdout)["models"])
    names = ["net.1.weight", "net.3.weight", "net.5.weight"]  # every weight matrix of the MLP, one row each
    assert sorted(row["name"] for row in quantized) == sorted(row["name"] for row in base) == names
    assert all(row["sqnr_db"] is None for row in base)  # the baseline against itself: exact
    assert all(row["stored"] == "int8" and row["sqnr_db"] is not None and row["sqnr_db"] > 30 for row in quantized)
    sizes = {row["name"]: row["bytes"] for row in base}
    assert all(row["bytes"] < 0.3 * sizes[row["name"]] for row in quantized)  # int8 + scales: about a quarter of float32


@pytest.mark.slow
def test_memory_is_measured_in_a_fresh_process(runner) -> None:
    r = invoke(runner, "report", SAMPLE["mlp"], "--memory", "--no-latency", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["models"][0]["peak_memory_bytes"] > SAMPLE["mlp"].stat().st_size


def test_fail_if_gate_exit_codes(tmp_path: Path, runner) -> None:
    out = tmp_path / "p.safetensors"
    r = invoke(
        runner,
        "prune",
        SAMPLE["mlp"],
        "-o",
        out,
        "--sparsity",
        "0.9",
        "--data",
        DIGITS_TEST,
        "--no-latency",
        "--fail-if",
        "accuracy_drop>0.0001",
    )
    assert r.exit_code == 1 and "gate failed" in r.stderr
    assert out.exists()  # the gate judges the result; the file was still written
    r = invoke(runner, "report", SAMPLE["mlp"], out, "--data", DIGITS_TEST, "--no-latency", "--fail-if", "accuracy_drop>0.9")
    assert r.exit_code == 0


def test_report_without_model_reference_shows_sizes_only(tmp_path: Path, runner) -> None:
    import torch

    p = tmp_path / "bare.pt"
    torch.save({"w": torch.ones(4, 4)}, p)
    r = invoke(runner, "report", p, "--format", "json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["models"][0]
    assert m["parameters"] == 16 and m["latency_ms"] is None and "no model reference" in m["notes"][0]


@pytest.mark.slow
def test_report_subprocess_json_is_clean_stdout() -> None:
    p = run_cli("report", SAMPLE["cnn"], "--data", DIGITS_TEST, "--format", "json", *FAST)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)  # stdout holds JSON only: no logs mixed in
    assert d["models"][0]["accuracy"] == pytest.approx(KNOWN_ACCURACY["cnn"], abs=6e-4)


def test_columns_flag(runner) -> None:
    r = invoke(runner, "report", SAMPLE["mlp"], "--columns", "size,params", "--no-latency")
    assert r.exit_code == 0, r.output
    assert "params" in r.stdout and "50,826" in r.stdout and "acc drop" not in r.stdout
    r = invoke(runner, "report", SAMPLE["mlp"], "--columns", "speed", "--no-latency")
    one_line_error(r, "--columns 'speed'", "unknown column")
