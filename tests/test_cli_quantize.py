"""``infercomp quantize``: CliRunner and one real subprocess, on the trained sample models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import infercomp
import infercomp.formats as formats
from infercomp import checkpoint
from infercomp.quantize import SCHEMES
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, KNOWN_ACCURACY, SAMPLE, invoke, one_line_error, run_cli

NO_LAT = ("--min-time", "0.05", "--warmup", "1")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--group-size", "7"), ("--group-size 7", "32, 64, 128, or -1 (per channel)")),
        (("--scheme", "int5"), ("--scheme 'int5'", "int8-dynamic")),
        (("--scheme", "int8-dynamic", "--column-scales"), ("--column-scales applies to", "--method rtn")),
        (("--scheme", "int4", "--group-size", "128", "--include", "net.1"), ("'net.1.weight' has rows of 64", "--group-size 128")),
    ],
)
def test_cli_bad_options_exit_2(runner, tmp_path: Path, args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    out = tmp_path / "o.safetensors"
    one_line_error(invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, "--no-latency", *args), *needles)
    assert not out.exists()


def test_cli_int8_on_sample_cnn(runner, tmp_path: Path) -> None:
    out = tmp_path / "cnn_int8.safetensors"
    r = invoke(runner, "quantize", SAMPLE["cnn"], "-o", out, "--data", DIGITS_TEST, "--layers", "--format", "json", *NO_LAT)
    assert r.exit_code == 0, r.stderr
    base, q = json.loads(r.stdout)["models"]
    assert q["ratios"]["size"] <= 0.27 and q["bits_per_weight"] < 9
    assert q["accuracy_drop"] <= 0.003 and q["fidelity"]["cosine_mean"] > 0.999
    assert q["latency_ms"]["median"] > 0
    sq = [row["sqnr_db"] for row in q["layers"] if row["stored"] == "int8"]
    assert len(sq) == 5 and min(sq) > 35  # 3 convs + 2 Linear, every one quantized
    assert base["accuracy"] == pytest.approx(KNOWN_ACCURACY["cnn"], abs=1e-3)


def test_cli_int4_gptq_on_sample_mlp(runner, tmp_path: Path) -> None:
    out = tmp_path / "mlp_int4.safetensors"
    r = invoke(
        runner, "quantize", SAMPLE["mlp"], "-o", out, "--scheme", "int4", "--method", "gptq", "--data", DIGITS_TRAIN,
        "--eval-data", DIGITS_TEST, "--format", "json", "--no-latency",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    q = json.loads(r.stdout)["models"][1]
    assert q["ratios"]["size"] <= 0.16 and q["accuracy_drop"] <= 0.01
    ck = checkpoint.load(out)
    assert ck.history[-1]["config"]["method"] == "gptq" and ck.encodings["net.1.weight"]["group_size"] == 32
    per_channel = tmp_path / "mlp_int4_channel.safetensors"
    r = invoke(runner, "quantize", SAMPLE["mlp"], "-o", per_channel, "--scheme", "int4", "--group-size", "-1", "--method", "gptq",
               "--data", DIGITS_TRAIN, "--eval-data", DIGITS_TEST, "--format", "json", "--no-latency")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    spec = checkpoint.load(per_channel).encodings["net.1.weight"]
    assert spec["granularity"] == "channel" and spec["group_size"] is None  # one scale per output channel
    assert json.loads(r.stdout)["models"][1]["ratios"]["size"] < q["ratios"]["size"]  # fewer scales to store


@pytest.mark.slow  # 2 s idle, 4-8 s on a loaded 2-core machine; test_cli.py keeps a quantize subprocess in the fast suite
def test_cli_subprocess_int8_dynamic(tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    r = run_cli(
        "quantize", SAMPLE["transformer"], "-o", out, "--scheme", "int8-dynamic", "--data", DIGITS_TEST, "--format", "json", *NO_LAT
    )
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)["models"][1]
    assert q["accuracy_drop"] <= 0.01 and q["fidelity"]["cosine_mean"] > 0.99
    m = infercomp.load(out)
    # Layers this small run as plain float Linear layers holding the decoded int8 weights.
    ck = checkpoint.load(out)
    assert ck.encodings["layers.0.fc1.weight"]["codec"] == "int8-dynamic" and type(m.layers[0].fc1) is nn.Linear
    decoded = formats.logical_tensors(ck.tensors, ck.encodings)["layers.0.fc1.weight"]
    assert torch.equal(m.layers[0].fc1.weight, decoded)


def test_every_scheme_is_listed_in_help(runner) -> None:
    r = invoke(runner, "quantize", "--help")
    assert r.exit_code == 0
    for s in SCHEMES:
        assert s in r.stdout


def test_half_precision_cast_keeps_sparse_storage(runner, tmp_path: Path) -> None:
    pruned, half = tmp_path / "p.safetensors", tmp_path / "p16.safetensors"
    assert invoke(runner, "prune", SAMPLE["mlp"], "-o", pruned, "--sparsity", "0.9", "--no-latency").exit_code == 0
    assert invoke(runner, "quantize", pruned, "-o", half, "--scheme", "fp16", "--no-latency").exit_code == 0
    ck = checkpoint.load(half)
    assert ck.encodings and all(e["codec"] == "sparse-bitmask" for e in ck.encodings.values())
    assert half.stat().st_size < 0.75 * pruned.stat().st_size  # half the bytes per value, same bitmasks
    assert half.stat().st_size < 0.5 * 2 * SAMPLE["mlp"].stat().st_size / 4  # far below a dense fp16 file
    before = formats.logical_tensors(checkpoint.load(pruned).tensors, checkpoint.load(pruned).encodings)
    after = formats.logical_tensors(ck.tensors, ck.encodings)
    for name, w in before.items():
        assert torch.equal(after[name] == 0, w == 0) or not w.is_floating_point(), name
