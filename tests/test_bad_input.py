"""Bad input is exit 2 with one line, found before any work where it can be, and exit 2 leaves no
output (README, *Exit codes*). Each case here was found by driving the CLI as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import infercomp.pipeline as pipeline
from infercomp import checkpoint
from infercomp.errors import CheckpointError, DataError, GateFailed, UsageError
from infercomp.recipe import load, run
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, SAMPLE, invoke, one_line_error, run_cli


def _data(tmp_path: Path, name: str, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    p = tmp_path / name
    save_file({"inputs": inputs, **({"labels": labels} if labels is not None else {})}, str(p))
    return p


@pytest.mark.parametrize(
    "args",
    [
        ["quantize", "--scheme", "int8"],
        ["quantize", "--scheme", "int4", "--method", "gptq"],  # calibration ran the bad data: exit 3 before
        ["prune", "--method", "wanda", "--sparsity", "0.5"],
        ["prune", "--method", "channel", "--sparsity", "0.5", "--importance", "activation"],
        ["export"],
    ],
)
def test_data_the_model_cannot_take_is_exit_2_before_any_work(runner, tmp_path: Path, args: list[str]) -> None:
    bad = _data(tmp_path, "bad.safetensors", torch.randn(10, 3, 5, 5))
    out = tmp_path / "o.safetensors"
    r = invoke(runner, args[0], SAMPLE["cnn"], "-o", out, *args[1:], "--data", bad, "--no-latency")
    one_line_error(r, "bad.safetensors", "cannot run on 'inputs' of shape (3, 5, 5)")
    assert not out.exists() and "was removed" not in r.stderr  # found before the work, not after the write


def test_labels_beyond_the_class_scores_are_found_before_writing(runner, tmp_path: Path) -> None:
    x = torch.randn(10, 1, 8, 8)
    bad = _data(tmp_path, "labels.safetensors", x, torch.arange(10) * 11)
    out = tmp_path / "o.safetensors"
    for option in ("--data", "--eval-data"):
        extra = ["--data", DIGITS_TEST] if option == "--eval-data" else []
        r = invoke(runner, "quantize", SAMPLE["cnn"], "-o", out, *extra, option, bad, "--no-latency")
        one_line_error(r, "labels.safetensors", "'labels' go up to 99 but the model outputs 10 class scores")
        assert not out.exists() and "was removed" not in r.stderr


def test_distill_validation_data_is_checked_before_training(runner, tmp_path: Path) -> None:
    bad = _data(tmp_path, "val.safetensors", torch.randn(10, 3, 5, 5))
    out = tmp_path / "s.safetensors"
    r = invoke(
        runner, "distill", SAMPLE["cnn"], "-o", out, "--student-model", "digits-mlp", "--data", DIGITS_TRAIN, "--val-data", bad,
        "--epochs", "1", "--no-latency",
    )  # fmt: skip
    one_line_error(r, "val.safetensors", "cannot run on")
    assert not out.exists()


def test_an_error_after_the_output_was_written_removes_it(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 leaves no output even where the problem shows only while the output is measured."""

    def compare(*args, **kwargs):
        raise DataError("d.safetensors: something only the measurement finds")

    monkeypatch.setattr(pipeline, "compare", compare)
    out = tmp_path / "o.safetensors"
    r = invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, "--no-latency")
    one_line_error(r, "something only the measurement finds", f"(the output {out} was removed)")
    assert not out.exists()


def test_an_interrupt_while_measuring_keeps_the_finished_output_and_says_so(
    runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def compare(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compare", compare)
    out = tmp_path / "o.safetensors"
    r = invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, "--no-latency")
    assert r.exit_code == 130
    assert r.stderr.strip() == f"infercomp: interrupted while the output was measured; {out} was written completely and is kept"
    assert invoke(runner, "report", out, "--no-latency").exit_code == 0  # complete: it loads


def test_an_interrupt_while_a_distilled_output_is_measured_drops_the_training_state(
    runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output is complete: a --resume retry must not find a stale state (it would be refused
    by the existing output)."""

    def compare(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compare", compare)
    out = tmp_path / "s.safetensors"
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", out, "--student-model", "digits-mlp", "--data", DIGITS_TEST, "--epochs", "1")
    assert r.exit_code == 130 and out.exists()
    assert not (tmp_path / "s.train-state.safetensors").exists()


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("zero.npz", b"", "not a .npz file"),
        ("text.npz", b"inputs,labels\n1,2\n", "not a .npz file"),
    ],
)
def test_data_files_that_are_not_what_their_suffix_says(runner, tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--data", p, "--no-latency"), name, needle)


def test_npz_still_reads(runner, tmp_path: Path) -> None:
    p = tmp_path / "ok.npz"
    np.savez(p, inputs=np.random.rand(4, 64).astype(np.float32), labels=np.arange(4))
    assert invoke(runner, "report", SAMPLE["mlp"], "--data", p, "--no-latency").exit_code == 0


def test_binary_files_where_text_is_expected(runner, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 4
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(blob)
    one_line_error(invoke(runner, "run", recipe), "r.yaml", "not UTF-8")
    config = tmp_path / "c.json"
    config.write_bytes(blob)
    args = ["report", SAMPLE["mlp"], "--model", "digits-mlp", "--no-latency", "--model-config"]
    one_line_error(invoke(runner, *args, config), "c.json", "not UTF-8")
    one_line_error(invoke(runner, *args, tmp_path), "--model-config is not a readable JSON file")


def test_a_failed_gate_in_a_recipe_fails_again_on_the_next_run(tmp_path: Path) -> None:
    """Its step is not recorded as up to date, so an unchanged re-run cannot pass."""
    p = tmp_path / "r.yaml"
    p.write_text(
        f"model: {SAMPLE['mlp']}\nout: out\nsteps:\n"
        f"  - name: q\n    quantize: {{scheme: int8, data: {DIGITS_TEST}, no_latency: true, fail_if: ['size_ratio>0.01']}}\n"
        "  - name: after\n    quantize: {scheme: int4}\n"
    )
    for _ in range(2):
        with pytest.raises(GateFailed, match="gate failed"):
            run(load(p))
        assert not (tmp_path / "out" / "after.safetensors").exists()


def test_a_gate_on_a_one_model_report_applies_to_that_model(runner) -> None:
    args = ["report", SAMPLE["mlp"], "--data", DIGITS_TEST, "--no-latency", "--fail-if"]
    r = invoke(runner, *args, "accuracy<0.999")
    assert r.exit_code == 1 and "accuracy = 0.98" in r.stderr
    assert invoke(runner, *args, "accuracy<0.5").exit_code == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["prune", str(SAMPLE["mlp"]), "-o", "x.safetensors", "--sparsity", "abc"], "'--sparsity'"),
        (["prune", str(SAMPLE["mlp"])], "Missing option '--output'"),
        (["report", str(SAMPLE["mlp"]), "--bogus"], "No such option: --bogus"),
        (["bogus"], "No such command 'bogus'"),
    ],
)
def test_usage_errors_are_one_line_too(tmp_path: Path, args: list[str], needle: str) -> None:
    """click's usage block (Usage / Try / blank / Error) is four lines; ours is one, with the hint."""
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infercomp: error: ") and needle in lines[0], r.stderr
    assert "--help')" in lines[0]


def test_a_gated_transform_step_prints_its_comparison(runner, tmp_path: Path) -> None:
    """`run --format json` gives the figures behind a failed gate, as a single command does."""
    p = tmp_path / "r.yaml"
    p.write_text(
        f"model: {SAMPLE['mlp']}\nout: out\nsteps:\n"
        f"  - name: q\n    quantize: {{scheme: int8, data: {DIGITS_TEST}, no_latency: true, fail_if: ['size_ratio>0.01']}}\n"
    )
    r = invoke(runner, "run", p, "--format", "json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["models"][1]["ratios"]["size"] > 0.01


def test_directory_problems_name_the_directory(runner, tmp_path: Path) -> None:
    no_config = tmp_path / "weights_only"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(SAMPLE["mlp"].read_bytes())
    one_line_error(invoke(runner, "quantize", no_config, "-o", tmp_path / "o", "--no-latency"), "weights_only: has no config.json")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no-such-architecture"}')
    save_file({"w": torch.zeros(2, 2)}, str(unknown / "model.safetensors"))
    r = invoke(runner, "report", unknown, "--no-latency")
    one_line_error(r, "does not know model_type 'no-such-architecture'")
    assert len(r.stderr) < 300  # not transformers' list of every model type it knows
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text('{"model_type": "bert"}')
    one_line_error(invoke(runner, "quantize", config_only, "-o", tmp_path / "o2", "--no-latency"), "holds no *.safetensors")


def test_an_output_under_a_file_says_so(runner, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = invoke(runner, "quantize", SAMPLE["mlp"], "-o", tmp_path / "afile" / "o.safetensors", "--no-latency")
    one_line_error(r, "afile is a file, not a folder")


def test_int4_leaves_rows_of_odd_length_in_float(runner, tmp_path: Path) -> None:
    """int4 stores two values a byte: the CNN's first conv (rows of 9) stays float, with a note (was exit 3)."""
    out = tmp_path / "o.safetensors"
    r = invoke(runner, "quantize", SAMPLE["cnn"], "-o", out, "--scheme", "int4", "--group-size", "-1", "--no-latency")
    assert r.exit_code == 0 and "'features.0.weight' has rows of 9 values, an odd number" in r.stderr
    encodings = checkpoint.load(out).encodings
    assert "features.0.weight" not in encodings and encodings["features.3.weight"]["codec"] == "int4"


@pytest.mark.parametrize(
    "args", [["quantize"], ["quantize", "--scheme", "fp8"], ["prune", "--sparsity", "0.5"], ["prune", "--method", "2:4"]]
)
def test_empty_tensors_pass_through(runner, tmp_path: Path, args: list[str]) -> None:
    src = tmp_path / "z.safetensors"
    save_file({"a.weight": torch.zeros(0, 64), "b.weight": torch.zeros(4, 0), "c.weight": torch.randn(8, 64)}, str(src))
    out = tmp_path / "o.safetensors"
    r = invoke(runner, args[0], src, "-o", out, *args[1:], "--no-latency")
    assert r.exit_code == 0, r.stderr
    back = checkpoint.load(out)
    assert set(back.encodings) <= {"c.weight"} and tuple(back.tensors["a.weight"].shape) == (0, 64)


def test_an_output_another_run_wrote_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """Without --force, the existence check and the final rename were two steps: two runs could
    both succeed, one silently replacing the other. The rename now fails on an existing name."""
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"the other run's output")
    with pytest.raises(CheckpointError, match="written by another run meanwhile"):
        checkpoint.write_safetensors(out, {"w": torch.zeros(2)}, {}, exclusive=True)
    assert out.read_bytes() == b"the other run's output" and list(tmp_path.iterdir()) == [out]
    checkpoint.write_safetensors(out, {"w": torch.zeros(2)}, {})  # --force: replaced
    assert checkpoint.load(out).tensors["w"].shape == (2,)


def test_an_input_rewritten_during_the_run_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import infercomp
    from infercomp.quantize import QuantizeConfig

    src = tmp_path / "in.safetensors"
    src.write_bytes(SAMPLE["mlp"].read_bytes())
    real = pipeline.TRANSFORMS[QuantizeConfig]

    def rewriting(ckpt, config, ctx):
        src.write_bytes(SAMPLE["mlp"].read_bytes() + b" ")  # another process saves over it meanwhile
        return real(ckpt, config, ctx)

    monkeypatch.setitem(pipeline.TRANSFORMS, QuantizeConfig, rewriting)
    out = tmp_path / "o.safetensors"
    with pytest.raises(CheckpointError, match="changed while this run read it"):
        infercomp.quantize(src, out, measure=False)
    assert not out.exists()


def test_transforming_a_quantized_input_says_what_happens_to_it(runner, tmp_path: Path) -> None:
    q = tmp_path / "q.safetensors"
    assert invoke(runner, "quantize", SAMPLE["mlp"], "-o", q, "--scheme", "int4", "--no-latency").exit_code == 0
    r = invoke(runner, "prune", q, "-o", tmp_path / "p.safetensors", "--sparsity", "0.5", "--no-latency")
    assert r.exit_code == 0 and "quantized weight(s) (int4): they are decoded to float to be pruned" in r.stderr
    r = invoke(runner, "quantize", q, "-o", tmp_path / "r.safetensors", "--scheme", "int4", "--no-latency", "--format", "json")
    assert r.exit_code == 0 and "rounding errors add up" in json.loads(r.stdout)["models"][1]["notes"][0]


def test_api_arguments_are_checked() -> None:
    import infercomp

    assert len(infercomp.report(str(SAMPLE["mlp"]), latency=False).models) == 1  # one path, not its characters
    with pytest.raises(UsageError, match="sparsity must be a number"):
        infercomp.prune(SAMPLE["mlp"], "x.safetensors", sparsity="0.5")
    with pytest.raises(UsageError, match="group_size must be an integer"):
        infercomp.quantize(SAMPLE["mlp"], "x.safetensors", scheme="int4", group_size="32")
    with pytest.raises(UsageError, match=r"not bf16 \(no scales\)"):
        infercomp.quantize(SAMPLE["mlp"], "x.safetensors", scheme="bf16", group_size=32)


def test_odd_paths_and_metadata_get_their_own_message(runner, tmp_path: Path) -> None:
    link = tmp_path / "o.safetensors"
    link.symlink_to(tmp_path / "nowhere" / "x.safetensors")
    one_line_error(invoke(runner, "quantize", SAMPLE["mlp"], "-o", link, "--no-latency"), "broken symbolic link")
    deep = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(deep), {"infercomp": "[" * 100_000 + "]" * 100_000})
    one_line_error(invoke(runner, "report", deep, "--no-latency"), "nested too deeply")


@pytest.mark.parametrize("stream", [False, True])
def test_the_commands_write_exclusively_without_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    """The early existence check passes (another run has not finished yet); the other run's
    output appears before ours is renamed into place: ours fails, theirs stays."""
    import infercomp

    out = tmp_path / "o.safetensors"
    monkeypatch.setattr(checkpoint, "check_output", lambda *a, **k: out.write_bytes(b"theirs"))
    with pytest.raises(CheckpointError, match="written by another run meanwhile"):
        infercomp.quantize(SAMPLE["mlp"], out, scheme="int8", measure=False, stream=stream)
    assert out.read_bytes() == b"theirs"
