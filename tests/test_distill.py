"""infercomp distill: the loss, config validation, training behaviour, resume, bad input."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import infercomp.formats as formats
from infercomp import checkpoint, measure
from infercomp.data import load_data
from infercomp.distill import DistillConfig, kd_loss, kd_loss_per_sample, state_path
from infercomp.distill import state as train_state
from infercomp.distill.loss import FeatureMatch, parse_layer_pairs, soft_loss
from infercomp.distill.trainer import epoch_order, lr_factor, rng_state, set_rng_state
from infercomp.errors import ModelError, UsageError
from infercomp.measure import MeasureOptions
from infercomp.models import ModelLoader
from infercomp.pipeline import run
from infercomp.progress import Progress, Task
from infercomp.zoo import DigitsCNN
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, SAMPLE, invoke, run_cli

NO_LAT = "--no-latency"
SMALL_MLP = '{"hidden": [32]}'


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- loss


def test_kd_loss_matches_hand_computed_value() -> None:
    s, t, y = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 0
    temp, alpha = 2.0, 0.5

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    p_t, p_s = softmax([v / temp for v in t]), softmax([v / temp for v in s])
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))  # KL(p_t || p_s)
    ce = -math.log(softmax(s)[y])
    expected = alpha * temp**2 * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), temperature=temp, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # On paper: s/T = [.5, 1, 1.5] -> p_s = [.18632, .30720, .50648], p_t the reverse, so
    # KL = (.50648 - .18632) * ln(e) = .32016; CE = ln(1 + e + e^2) = 2.40761;
    # 0.5 * 4 * .32016 + 0.5 * 2.40761 = 1.84412.
    assert expected == pytest.approx(1.84412, abs=1e-4)


def test_alpha_edges_and_identical_logits() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean") * 9
    assert float(kd_loss(s, t, y, temperature=3, alpha=0.0)) == pytest.approx(float(ce), rel=1e-6)
    assert float(kd_loss(s, t, y, temperature=3, alpha=1.0)) == pytest.approx(float(kl), rel=1e-5)
    # Identical logits: the soft term vanishes, only (1 - alpha) * CE remains.
    assert float(kd_loss(s, s, y, temperature=3, alpha=0.7)) == pytest.approx(0.3 * float(ce), rel=1e-5)
    # alpha 0 with every sample labeled needs no teacher at all.
    assert float(kd_loss_per_sample(s, None, y, temperature=3, alpha=0.0).mean()) == pytest.approx(float(ce), rel=1e-6)
    with pytest.raises(UsageError):
        kd_loss_per_sample(s, None, None, temperature=3, alpha=0.0)


def test_temperature_limits() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    # T -> inf: T^2 * KL -> sum((d - mean d)^2) / (2C), d = s - t (Hinton et al., logit matching).
    d = s - t
    limit = ((d - d.mean(1, keepdim=True)) ** 2).sum(1) / (2 * 10)
    assert torch.allclose(soft_loss(s, t, temperature=1000.0), limit, rtol=2e-3)
    # Tiny T: softmax becomes one-hot, the loss stays finite and non-negative.
    tiny = soft_loss(s, t, temperature=1e-3)
    assert torch.isfinite(tiny).all() and (tiny >= 0).all()
    assert float(soft_loss(t, t, temperature=1e-3).abs().max()) < 1e-6


def test_unlabeled_samples_learn_from_the_teacher_alone() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    soft = soft_loss(s, t, temperature=2.0)
    assert torch.allclose(kd_loss_per_sample(s, t, None, temperature=2.0, alpha=0.3), soft)
    y = torch.tensor([1, -1, 2, -1, 0, 4])  # negative label = unlabeled sample
    mixed = kd_loss_per_sample(s, t, y, temperature=2.0, alpha=0.3)
    ce = F.cross_entropy(s, y.clamp(min=0), reduction="none")
    lab = y >= 0
    assert torch.allclose(mixed[~lab], soft[~lab])
    assert torch.allclose(mixed[lab], 0.3 * soft[lab] + 0.7 * ce[lab])


def test_embedding_losses() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(soft_loss(a, 3 * a, temperature=1, kind="cosine"), torch.zeros(2), atol=1e-6)
    assert torch.allclose(soft_loss(a, -a, temperature=1, kind="cosine"), torch.full((2,), 2.0))
    assert torch.allclose(soft_loss(a, a + 1, temperature=1, kind="mse"), torch.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "--temperature"),
        ({"temperature": -1.0}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"temperature": float("inf")}, "--temperature"),
        ({"alpha": -0.1}, "--alpha"),
        ({"alpha": 1.5}, "--alpha"),
        ({"alpha": float("nan")}, "--alpha"),
        ({"epochs": 0}, "--epochs"),
        ({"lr": 0.0}, "--lr"),
        ({"output_loss": "l1"}, "--output-loss"),
        ({"feature_loss": "kl"}, "--feature-loss"),
        ({"feature_layers": ("fc1",)}, "--feature-loss mse"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        DistillConfig(student_model="digits-mlp", **kwargs)


def test_config_needs_exactly_one_student_and_omits_resume_from_history() -> None:
    with pytest.raises(UsageError, match="exactly one"):
        DistillConfig()
    with pytest.raises(UsageError, match="exactly one"):
        DistillConfig(student="a.safetensors", student_model="digits-mlp")
    cfg = DistillConfig(student_model="digits-mlp", resume=True)
    assert "resume" not in cfg.to_dict() and cfg.to_dict()["temperature"] == 4.0


def test_schedule_and_data_order() -> None:
    total = 100
    assert lr_factor(0, total) == pytest.approx(1 / 5) and lr_factor(4, total) == pytest.approx(1.0)
    assert lr_factor(99, total) < 0.01 and all(0 <= lr_factor(s, total) <= 1 for s in range(total))
    assert torch.equal(epoch_order(50, 3, 2), epoch_order(50, 3, 2))
    assert not torch.equal(epoch_order(50, 3, 2), epoch_order(50, 3, 3))


# --------------------------------------------------------------------------------- feature loss


def test_feature_match_projects_different_widths() -> None:
    torch.manual_seed(0)
    teacher, student = DigitsCNN(), DigitsCNN(channels=(16, 32, 64), hidden=64)
    x = torch.rand(3, 1, 8, 8)
    fm = FeatureMatch(student, teacher, parse_layer_pairs((), student, teacher), x)
    assert isinstance(fm.proj[0], nn.Linear) and tuple(fm.proj[0].weight.shape) == (128, 64)  # hidden 64 -> 128
    fm2 = FeatureMatch(student, teacher, parse_layer_pairs(("features.8", "features.5=features.5"), student, teacher), x)
    assert isinstance(fm2.proj[0], nn.Conv2d) and fm2.proj[0].weight.shape[:2] == (128, 64)  # 1x1 conv on channels
    teacher(x), student(x)
    loss = fm2.loss_per_sample()
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert fm2.proj[0].weight.grad is not None
    same = FeatureMatch(teacher, teacher, parse_layer_pairs((), teacher, teacher), x)
    assert isinstance(same.proj[0], nn.Identity)
    for f in (fm, fm2, same):
        f.close()
    with pytest.raises(UsageError, match="no module 'nope'"):
        parse_layer_pairs(("nope",), student, teacher)
    with pytest.raises(ModelError, match="differ in more than the channel width"):
        FeatureMatch(student, teacher, parse_layer_pairs(("features.2=features.9",), student, teacher), x)


# ------------------------------------------------------------------------------------ training


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


def test_feature_loss_and_embedding_output_loss_run(tmp_path: Path) -> None:
    for name, kw in (("feat", {"feature_loss": "mse", "feature_weight": 0.5}), ("cos", {"output_loss": "cosine", "alpha": 1.0})):
        cfg = DistillConfig(student_model="digits-mlp", student_config={"hidden": [32]}, epochs=3, lr=0.01, **kw)
        out = tmp_path / f"{name}.safetensors"
        cmp = run(SAMPLE["mlp"], out, cfg, loader=ModelLoader(), options=MeasureOptions(latency=False), data=DIGITS_TEST)
        assert cmp.models[1].fidelity is not None and cmp.models[1].fidelity["cosine_mean"] > 0.3
        assert set(checkpoint.load(out).tensors) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}  # no projections


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


class _StopAt(Progress):
    """Sends this process SIGINT (as Ctrl-C would) after ``stop`` training steps."""

    def __init__(self, stop: int):
        self.stop, self.steps = stop, 0

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        outer = self

        class T(Task):
            def advance(self, n: float = 1, **fields) -> None:
                if description == "distilling" and fields:
                    outer.steps += int(n)
                    if outer.steps == outer.stop:
                        os.kill(os.getpid(), signal.SIGINT)

        yield T()


@pytest.mark.parametrize("stop", [3, 6])  # mid-epoch, and right at an epoch boundary (6 steps/epoch)
def test_resume_after_interrupt_equals_uninterrupted(tmp_path: Path, stop: int) -> None:
    def go(out: Path, *, resume: bool = False, progress: Progress | None = None) -> None:
        cfg = DistillConfig(student_model="digits-cnn", student_config={"channels": [4, 8, 8], "hidden": 16}, epochs=2,
                            val_data=str(DIGITS_TEST), resume=resume, feature_loss="mse")  # fmt: skip
        kw = {"progress": progress} if progress is not None else {}
        run(SAMPLE["cnn"], out, cfg, loader=ModelLoader(), options=MeasureOptions(latency=False), data=DIGITS_TEST, **kw)

    ref, out = tmp_path / "ref.safetensors", tmp_path / "out.safetensors"
    go(ref)
    with pytest.raises(KeyboardInterrupt):
        go(out, progress=_StopAt(stop))
    st = state_path(out)
    assert st.exists() and not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    saved = train_state.load(st)
    assert (saved.epoch, saved.step) == divmod(stop, 6) and not saved.info["finished"]
    with safe_open(str(st), framework="pt") as f:  # a plain safetensors file: tensors + JSON metadata
        assert any(k.startswith("optim.") for k in f.keys()) and "infercomp.train_state" in f.metadata()
    go(out, resume=True)
    assert _sha(out) == _sha(ref)


def test_resume_refuses_a_state_from_other_options(runner, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    cfg = DistillConfig(student_model="digits-mlp", student_config={"hidden": [32]}, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        run(SAMPLE["mlp"], out, cfg, loader=ModelLoader(), options=MeasureOptions(latency=False), data=DIGITS_TEST, progress=_StopAt(2))
    r = invoke(runner, "distill", SAMPLE["mlp"], "-o", out, "--data", DIGITS_TEST, "--student-model", "digits-mlp",
               "--student-config", SMALL_MLP, "--epochs", "3", "--resume", NO_LAT)  # fmt: skip
    assert r.exit_code == 2
    assert "epochs 2 -> 3" in r.stderr and "without --resume" in r.stderr


# ------------------------------------------------------------------------------------- bad input


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
    assert r.exit_code == 2 and "'labels' go up to 12 but the models output 10 classes" in r.stderr


def test_help_describes_the_options(runner) -> None:
    r = invoke(runner, "distill", "--help")
    assert r.exit_code == 0
    for text in ("--resume", "--feature-loss", "--output-loss", "--val-data", "torchrun", "bf16"):
        assert text in r.stdout


# ------------------------------------------------------------------------------ real subprocess


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


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])],
)
def test_rng_state_round_trip(device: str) -> None:
    """--resume restores the generators dropout draws from: CPU, and the GPU's when training there."""
    dev = torch.device(device)
    saved = rng_state(dev)
    first = torch.rand(4), torch.rand(4, device=dev)
    set_rng_state(saved, dev)
    again = torch.rand(4), torch.rand(4, device=dev)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    if device == "cpu":  # a state written on a GPU restores its CPU part on CPU
        longer = torch.cat([saved, torch.zeros(16, dtype=torch.uint8)])
        set_rng_state(longer, dev)
        assert torch.equal(torch.rand(4), first[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trains_with_bf16_autocast(tmp_path: Path) -> None:
    cfg = DistillConfig(student_model="digits-cnn", student_config={"channels": [16, 32, 64], "hidden": 64}, epochs=3)
    out = tmp_path / "s.safetensors"
    cmp = run(SAMPLE["cnn"], out, cfg, loader=ModelLoader(), options=MeasureOptions(device="cuda", latency=False), data=DIGITS_TEST)
    assert checkpoint.load(out).tensors["classifier.3.weight"].dtype == torch.float32
    assert cmp.models[1].accuracy is not None and cmp.models[1].accuracy > 0.8


def test_pruning_plan_of_the_student_is_carried_into_the_output(runner, tmp_path: Path) -> None:
    pruned, out = tmp_path / "channel.safetensors", tmp_path / "student.safetensors"
    assert invoke(runner, "prune", SAMPLE["cnn"], "-o", pruned, "--method", "channel", "--sparsity", "0.5", NO_LAT).exit_code == 0
    r = invoke(runner, "distill", SAMPLE["cnn"], "-o", out, "--student", pruned, "--data", DIGITS_TEST, "--epochs", "1", NO_LAT)
    assert r.exit_code == 0, r.stderr
    assert checkpoint.load(out).plan == checkpoint.load(pruned).plan is not None
