"""``infercomp prune`` end to end: CliRunner and one real subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infercomp import checkpoint
from tests.conftest import DIGITS_TEST, SAMPLE, invoke, run_cli

FAST = ("--min-time", "0.05", "--warmup", "1")


def test_channel_prune_writes_a_smaller_model_that_report_loads(runner, tmp_path: Path) -> None:
    out = tmp_path / "cnn_channel.safetensors"
    r = invoke(runner, "prune", SAMPLE["cnn"], "-o", out, "--method", "channel", "--sparsity", "0.5", "--format", "json", "--no-latency")
    assert r.exit_code == 0, r.stderr
    after = json.loads(r.stdout)["models"][1]
    assert after["ratios"]["parameters"] <= 0.30 and after["ratios"]["size"] <= 0.30
    r = invoke(runner, "report", SAMPLE["cnn"], out, "--data", DIGITS_TEST, "--format", "json", "--batch-size", "256", *FAST)
    assert r.exit_code == 0, r.stderr
    base, small = json.loads(r.stdout)["models"]
    assert small["accuracy"] is not None and small["latency_ms"]["median"] > 0
    assert checkpoint.load(out).plan["prune"][0]["method"] == "channel"


def test_two_four_warns_about_skipped_layers(runner, tmp_path: Path) -> None:
    out = tmp_path / "cnn24.safetensors"
    r = invoke(runner, "prune", SAMPLE["cnn"], "-o", out, "--method", "2:4", "--data", DIGITS_TEST, "--no-latency", "-q")
    assert r.exit_code == 0, r.stderr
    assert "skipped features.0.weight: input size 9 is not divisible by 4" in r.stderr
    assert checkpoint.load(out).encodings["features.3.weight"]["pattern"] == "2:4"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sparsity", "1.5"), "--sparsity must be in [0, 1)"),
        (("--method", "2:4", "--include", "features.0"), "'features.0.weight' has input size 9, not divisible by 4"),
        (("--method", "wanda"), "--method wanda needs --data"),
        (("--method", "sparsegpt"), "--method sparsegpt needs --data"),
        (("--method", "channel", "--importance", "activation"), "--importance activation needs --data"),
        (("--method", "fancy"), "--method 'fancy' is not supported; choose one of: magnitude, channel, 2:4, wanda, sparsegpt"),
        (("--bias-correction",), "--bias-correction applies to --method wanda, not magnitude"),
        (("--refine",), "--refine applies to --method wanda, not magnitude"),
    ],
)
def test_bad_options_exit_2_with_one_line(runner, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = tmp_path / "o.safetensors"
    r = invoke(runner, "prune", SAMPLE["cnn"], "-o", out, *args, "--no-latency")
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_help_explains_the_methods(runner) -> None:
    r = invoke(runner, "prune", "--help")
    assert r.exit_code == 0
    for word in (
        "magnitude",
        "channel",
        "2:4",
        "wanda",
        "sparsegpt",
        "--importance",
        "--n",
        "--m",
        "bitmask",
        "--bias-correction",
        "--no-refine",
    ):
        assert word in r.stdout, word


@pytest.mark.slow
def test_subprocess_wanda_with_separate_eval_data(tmp_path: Path) -> None:
    out = tmp_path / "wanda.safetensors"
    p = run_cli("prune", SAMPLE["mlp"], "-o", out, "--method", "wanda", "--sparsity", "0.5",
                "--data", SAMPLE["mlp"].parent / "digits_train.safetensors", "--eval-data", DIGITS_TEST, *FAST)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert str(out) in p.stdout and "accuracy" in p.stdout
    assert "wanda: refined the masks of 3 layer(s)" in p.stderr  # the default, said on stderr
    assert checkpoint.load(out).history[-1]["config"]["refine"] is True
    assert checkpoint.load(out).encodings["net.1.weight"]["codec"] == "sparse-bitmask"


def test_wanda_bias_correction_through_the_cli(runner, tmp_path: Path) -> None:
    """--bias-correction (with the paper's masks, --no-refine): the same masks, other biases,
    recorded in the history; in a real subprocess too."""
    train = SAMPLE["mlp"].parent / "digits_train.safetensors"
    outs = {}
    for flag in ((), ("--bias-correction",)):
        out = tmp_path / f"w{len(flag)}.safetensors"
        r = invoke(
            runner, "prune", SAMPLE["mlp"], "-o", out, "--method", "wanda", "--data", train, "--no-refine", *flag, "--no-latency", "-q"
        )
        assert r.exit_code == 0, r.stderr
        outs[bool(flag)] = checkpoint.load(out)
    plain, corrected = outs[False], outs[True]
    assert corrected.history[-1]["config"]["bias_correction"] is True and plain.history[-1]["config"]["bias_correction"] is False
    assert plain.history[-1]["config"]["refine"] is False
    for name, t in plain.tensors.items():
        same = bool((t == corrected.tensors[name]).all())
        assert same != (name.endswith(".bias") and name.replace("bias", "weight") in plain.encodings), name
    p = run_cli("prune", SAMPLE["mlp"], "-o", tmp_path / "sub.safetensors", "--method", "wanda", "--data", train,
                "--bias-correction", "--no-latency", "-q")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert checkpoint.load(tmp_path / "sub.safetensors").tensors.keys() == corrected.tensors.keys()


def test_scope_ffn_on_a_model_without_attention_says_it_prunes_every_channel(runner, tmp_path: Path) -> None:
    r = invoke(runner, "prune", SAMPLE["cnn"], "-o", tmp_path / "o.safetensors", "--method", "channel", "--scope", "ffn", "--no-latency")
    assert r.exit_code == 0 and "has no attention heads, so it prunes every channel group" in r.stderr
    r = invoke(
        runner, "prune", SAMPLE["transformer"], "-o", tmp_path / "t.safetensors", "--method", "channel", "--scope", "ffn", "--no-latency"
    )
    assert r.exit_code == 0 and "has no attention heads" not in r.stderr
