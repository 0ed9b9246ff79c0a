"""``infercomp distill``: CliRunner and real subprocesses; one-line errors, signals, resume."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import infercomp.formats as formats
from infercomp import checkpoint, measure
from infercomp.data import load_data
from infercomp.distill import DistillConfig, state_path
from infercomp.measure import MeasureOptions
from infercomp.models import ModelLoader
from infercomp.pipeline import run
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, SAMPLE, StopAt, invoke, one_line_error, run_cli

NO_LAT = "--no-latency"
SMALL_MLP = '{"hidden": [32]}'


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _unlabeled(tmp_path: Path, n: int = 200) -> Path:
    p = tmp_path / "unlabeled.safetensors"
    save_file({"inputs": load_data(DIGITS_TEST).inputs[:n].contiguous()}, str(p))
    return p


def test_cli_distills_a_small_student_with_validation_and_best_epoch(runner, tmp_path: Path) -> None:
    out = tmp_path / "student.safetensors"
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", out, "--data", DIGITS_TEST, "--val-data", DIGITS_TEST,
               "--student-model", "digits-mlp", "--student-config", SMALL_MLP, "--epochs", "4", "--lr", "0.01", NO_LAT, "-f", "json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    vals = [float(line.split("validation accuracy ")[1].split()[0]) for line in r.stderr.splitlines() if "validation accuracy" in line]
    assert len(vals) == 4 and "(best so far)" in r.stderr
    ck = checkpoint.load(out)
    assert ck.model == {"ref": "digits-mlp", "config": {"hidden": [32]}}
    assert ck.history[-1]["transform"] == "distill" and ck.history[-1]["config"]["val_data"] == str(DIGITS_TEST)
    # The kept student is the best epoch's: its accuracy on the validation data is the best logged.
    data = load_data(DIGITS_TEST)
    acc = measure.accuracy(measure.predict(ModelLoader().build(ck), data, batch_size=64, device=torch.device("cpu")), data.labels)
    assert acc == pytest.approx(max(vals), abs=1e-4) and acc > 0.7
    assert not state_path(out).exists()  # finished: no resumable state left behind
    assert '"accuracy"' in r.stdout


def test_unlabeled_data_trains_on_the_teacher(runner, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", out, "--data", _unlabeled(tmp_path), "--student-model", "digits-mlp",
               "--student-config", SMALL_MLP, "--epochs", "3", "--alpha", "0", NO_LAT, "-f", "json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "no 'labels'" in r.stderr  # alpha 0 without labels: said, not silently ignored
    assert '"top1_agreement"' in r.stdout and out.exists()


def test_magnitude_pruned_student_keeps_its_zeros(runner, tmp_path: Path) -> None:
    pruned, out = tmp_path / "pruned.safetensors", tmp_path / "recovered.safetensors"
    assert invoke(runner, "prune", SAMPLE["mlp"], "-o", pruned, "--sparsity", "0.6", NO_LAT).exit_code == 0
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", out, "--data", DIGITS_TEST, "--student", pruned, "--epochs", "2", NO_LAT)
    assert r.exit_code == 0, r.stderr
    assert "pruned weights stay zero" in r.stderr
    before, after = (formats.logical_tensors(ck.tensors, ck.encodings) for ck in (checkpoint.load(pruned), checkpoint.load(out)))
    for name, w in before.items():
        if w.dim() == 2:
            assert torch.equal(after[name] == 0, w == 0), name  # same zeros, nothing regrown
    assert not torch.equal(after["net.1.weight"], before["net.1.weight"])  # and it did train


def test_same_seed_gives_identical_bytes(runner, tmp_path: Path) -> None:
    outs = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for out, seed in zip(outs, ("5", "5", "6")):
        r = invoke(runner, "distill", SAMPLE["mlp"], "-o", out, "--data", DIGITS_TEST, "--student-model", "digits-mlp",
                   "--student-config", SMALL_MLP, "--epochs", "2", "--seed", seed, NO_LAT)  # fmt: skip
        assert r.exit_code == 0, r.stderr
    assert _sha(outs[0]) == _sha(outs[1])
    assert _sha(outs[0]) != _sha(outs[2])


def test_resume_refuses_a_state_from_other_options(runner, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    cfg = DistillConfig(student_model="digits-mlp", student_config={"hidden": [32]}, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        run(SAMPLE["mlp"], out, cfg, loader=ModelLoader(), options=MeasureOptions(latency=False), data=DIGITS_TEST, progress=StopAt(2))
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", out, "--data", DIGITS_TEST, "--student-model", "digits-mlp",
               "--student-config", SMALL_MLP, "--epochs", "3", "--resume", NO_LAT)  # fmt: skip
    assert r.exit_code == 2
    assert "epochs 2 -> 3" in r.stderr and "without --resume" in r.stderr


def test_student_with_other_output_size_is_exit_2(runner, tmp_path: Path) -> None:
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", tmp_path / "s.safetensors", "--data", DIGITS_TEST,
               "--student-model", "digits-mlp", "--student-config", '{"num_classes": 7}', NO_LAT)  # fmt: skip
    assert r.exit_code == 2
    assert "student output shape (7,) differs from the teacher's (10,)" in r.stderr
    assert not (tmp_path / "s.safetensors").exists()


def test_data_without_inputs_is_exit_2(runner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(4, 64)}, str(bad))
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", tmp_path / "s.safetensors", "--data", bad, "--student-model", "digits-mlp", NO_LAT)
    assert r.exit_code == 2 and "has no 'inputs' tensor" in r.stderr


def test_other_bad_input_is_exit_2(runner, tmp_path: Path) -> None:
    base = ["distill", SAMPLE["mlp"], "-o", tmp_path / "s.safetensors", "--data", DIGITS_TEST, NO_LAT]
    r = invoke(runner, *base)
    assert r.exit_code == 2 and "exactly one of --student FILE or --student-model REF" in r.stderr
    r = invoke(runner, *base, "--student-model", "digits-mlp", "--temperature", "0")
    assert r.exit_code == 2 and "--temperature must be" in r.stderr
    r = invoke(runner, *base, "--student-model", "digits-mlp", "--feature-loss", "mse", "--feature-layers", "nope")
    assert r.exit_code == 2 and "no module 'nope'" in r.stderr
    bad = tmp_path / "labels.safetensors"
    save_file({"inputs": torch.zeros(4, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 12])}, str(bad))
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", tmp_path / "s.safetensors", "--data", bad, "--student-model", "digits-mlp", NO_LAT)
    assert r.exit_code == 2 and "'labels' go up to 12 but the model" in r.stderr


def test_help_describes_the_options(runner) -> None:
    r = invoke(runner, "distill", "--help")
    assert r.exit_code == 0
    for text in ("--resume", "--feature-loss", "--output-loss", "--val-data", "torchrun", "bf16"):
        assert text in r.stdout


@pytest.mark.slow
def test_sigterm_saves_state_and_resume_gives_the_same_bytes(tmp_path: Path) -> None:
    # Training data of 1437 images (23 steps an epoch): the signal lands with ~28 epochs to go.
    args = ["distill", SAMPLE["mlp"], "--data", DIGITS_TRAIN, "--val-data", DIGITS_TEST, "--student-model", "digits-mlp",
            "--student-config", SMALL_MLP, "--epochs", "30", NO_LAT, "--threads", "1"]  # fmt: skip
    ref, out = tmp_path / "ref.safetensors", tmp_path / "out.safetensors"
    assert run_cli(*args, "-o", ref).returncode == 0
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "infercomp", *map(str, args), "-o", str(out)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until training is under way
        if "epoch 2/30" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and not out.exists() and state_path(out).exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    p = run_cli(*args, "-o", out, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resuming from" in p.stderr and str(out) in p.stdout
    assert _sha(out) == _sha(ref) and not state_path(out).exists()


def test_pruning_plan_of_the_student_is_carried_into_the_output(runner, tmp_path: Path) -> None:
    pruned, out = tmp_path / "channel.safetensors", tmp_path / "student.safetensors"
    assert invoke(runner, "prune", SAMPLE["cnn"], "-o", pruned, "--method", "channel", "--sparsity", "0.5", NO_LAT).exit_code == 0
    r = invoke(runner, "distill", SAMPLE["cnn"], "-o", out, "--student", pruned, "--data", DIGITS_TEST, "--epochs", "1", NO_LAT)
    assert r.exit_code == 0, r.stderr
    assert checkpoint.load(out).plan == checkpoint.load(pruned).plan is not None


def test_distill_output_may_not_be_its_student(runner, tmp_path: Path) -> None:
    student = tmp_path / "student.safetensors"
    student.write_bytes(SAMPLE["mlp"].read_bytes())
    digest = hashlib.sha256(student.read_bytes()).hexdigest()
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", student, "--student", student, "--data", DIGITS_TEST, "--force", "--no-latency")
    one_line_error(r, "also an input of this run")
    assert hashlib.sha256(student.read_bytes()).hexdigest() == digest


def test_distill_student_code_named_by_the_user_is_trusted(runner, tmp_path: Path) -> None:
    code = tmp_path / "students.py"
    code.write_text("from infercomp.zoo import DigitsMLP\n\ndef small():\n    return DigitsMLP(hidden=(32,))\n")
    out = tmp_path / "s.safetensors"
    r = invoke(
        runner,
        "distill",
        SAMPLE["mlp"],
        "-o",
        out,
        "--student-model",
        f"{code}:small",
        "--data",
        DIGITS_TEST,
        "--epochs",
        "1",
        "--no-latency",
    )
    assert r.exit_code == 0, r.stderr
    assert checkpoint.load(out).model["ref"] == f"{code}:small"
    assert not list(tmp_path.glob("*.train-state*"))  # written: nothing left to resume
