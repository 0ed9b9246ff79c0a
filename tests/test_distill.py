"""distill/: the losses, config validation, what training achieves in each mode (fresh student,
student checkpoint, feature loss, embedding output losses), resume. (The command:
tests/test_cli_distill.py; torchrun: tests/test_distill_ddp.py.)"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import infercomp.formats as formats
from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.data import load_data
from infercomp.distill import DistillConfig, distill, kd_loss, kd_loss_per_sample, state_path
from infercomp.distill import state as train_state
from infercomp.distill.config import FINE_TUNE_LR, SCRATCH_LR
from infercomp.distill.loss import FeatureMatch, parse_layer_pairs, soft_loss
from infercomp.distill.trainer import epoch_order, lr_factor, rng_state, set_rng_state
from infercomp.errors import ModelError, UsageError
from infercomp.measure import MeasureOptions
from infercomp.models import ModelLoader
from infercomp.pipeline import run
from infercomp.progress import Progress
from infercomp.prune import PruneConfig, prune
from infercomp.transform import Context
from infercomp.zoo import DigitsCNN
from tests.conftest import DIGITS_TEST, SAMPLE, StopAt


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


def test_default_lr_fine_tunes_a_hugging_face_student_and_is_recorded(tmp_path: Path) -> None:
    """No --lr: 5e-5 for a student holding a Hugging Face model (a pretrained transformer is
    fine-tuned; 3e-3 wrecks it), 3e-3 otherwise; the value used is what the history records."""
    hf_student = tmp_path / "hf_student.safetensors"
    checkpoint.save(Checkpoint(tensors={"w": torch.zeros(2)}, model={"ref": "hf-auto", "config": {"model_type": "bert"}}), hf_student)
    cfg = DistillConfig(student=str(hf_student))
    assert cfg.lr == FINE_TUNE_LR == 5e-5 and cfg.to_dict()["lr"] == 5e-5
    assert DistillConfig(student=str(hf_student), lr=1e-3).lr == 1e-3  # given: kept
    assert DistillConfig(student=str(SAMPLE["mlp"])).lr == SCRATCH_LR == 3e-3
    assert DistillConfig(student_model="digits-mlp").lr == SCRATCH_LR
    assert DistillConfig(student=str(tmp_path / "missing.safetensors")).lr == SCRATCH_LR  # the load says what is wrong


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


def test_feature_loss_and_embedding_output_loss_run(tmp_path: Path) -> None:
    for name, kw in (("feat", {"feature_loss": "mse", "feature_weight": 0.5}), ("cos", {"output_loss": "cosine", "alpha": 1.0})):
        cfg = DistillConfig(student_model="digits-mlp", student_config={"hidden": [32]}, epochs=3, lr=0.01, **kw)
        out = tmp_path / f"{name}.safetensors"
        cmp = run(SAMPLE["mlp"], out, cfg, loader=ModelLoader(), options=MeasureOptions(latency=False), data=DIGITS_TEST)
        assert cmp.models[1].fidelity is not None and cmp.models[1].fidelity["cosine_mean"] > 0.3
        assert set(checkpoint.load(out).tensors) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}  # no projections


# The student's last hidden layer is as wide as the teacher's (128): features compare as they are.
STUDENT = {"hidden": [32, 128]}


def _run_on_test_digits(**kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distill the sample MLP into a fresh digits-mlp with ``kw``; (outputs, penultimate features) of
    the trained student and of the same student before training, on the test digits."""
    teacher_ckpt = checkpoint.load(SAMPLE["mlp"])
    data = load_data(DIGITS_TEST)
    ctx = Context(loader=ModelLoader(), data=data, device=torch.device("cpu"))
    cfg = DistillConfig(student_model="digits-mlp", student_config=STUDENT, epochs=5, lr=0.01, **kw)
    trained = ModelLoader().build(
        Checkpoint(tensors=distill(teacher_ckpt, cfg, ctx).tensors, model={"ref": "digits-mlp", "config": STUDENT})
    )
    torch.manual_seed(cfg.seed)  # distill initialises the fresh student from this seed
    initial = ModelLoader(ref="digits-mlp", config=STUDENT).build_fresh().eval()
    return (*_penultimate(trained, data.inputs), *_penultimate(initial, data.inputs))


def _penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, inputs of the last Linear layer)."""
    seen = []
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    hook = last.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(x)
    hook.remove()
    return out, seen[0]


@pytest.fixture(scope="module")
def teacher_on_test_digits() -> tuple[torch.Tensor, torch.Tensor]:
    return _penultimate(ModelLoader().build(checkpoint.load(SAMPLE["mlp"])), load_data(DIGITS_TEST).inputs)


def test_a_fresh_student_learns_from_the_teacher(teacher_on_test_digits) -> None:
    t_out, _ = teacher_on_test_digits
    out, _, init_out, _ = _run_on_test_digits()
    agree, init_agree = (float((o.argmax(1) == t_out.argmax(1)).float().mean()) for o in (out, init_out))
    assert init_agree < 0.3 and agree > 0.7, (init_agree, agree)


def test_feature_loss_pulls_the_hidden_features_to_the_teacher(teacher_on_test_digits) -> None:
    _, t_feat = teacher_on_test_digits
    _, feat, _, init_feat = _run_on_test_digits(feature_loss="mse", feature_weight=10.0)
    _, plain_feat, _, _ = _run_on_test_digits()  # logits alone: the hidden basis is the student's own
    err = {k: float((f - t_feat).pow(2).mean()) for k, f in (("feature", feat), ("plain", plain_feat), ("initial", init_feat))}
    assert err["feature"] < 0.6 * err["plain"] and err["feature"] < 0.6 * err["initial"], err


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_embedding_output_losses_pull_the_outputs_to_the_teacher(teacher_on_test_digits, kind: str) -> None:
    t_out, _ = teacher_on_test_digits
    out, _, init_out, _ = _run_on_test_digits(output_loss=kind, alpha=1.0)
    kl_out, _, _, _ = _run_on_test_digits(alpha=1.0)
    assert not torch.equal(out, kl_out)  # the option is used, not silently KL
    if kind == "mse":
        err, init_err = (float((o - t_out).pow(2).mean()) for o in (out, init_out))
        assert err < 0.6 * init_err, (err, init_err)
    else:
        cos, init_cos = (float(F.cosine_similarity(o, t_out).mean()) for o in (out, init_out))
        assert init_cos < 0.2 and cos > 0.6, (init_cos, cos)


def test_a_pruned_student_checkpoint_recovers_agreement(tmp_path: Path) -> None:
    teacher_ckpt = checkpoint.load(SAMPLE["mlp"])
    data = load_data(DIGITS_TEST)
    ctx = Context(loader=ModelLoader(), data=data, device=torch.device("cpu"))
    pruned = checkpoint.save(prune(teacher_ckpt, PruneConfig(sparsity=0.9), ctx), tmp_path / "p.safetensors")
    student = distill(teacher_ckpt, DistillConfig(student=str(pruned), epochs=2), ctx)
    assert student.model == teacher_ckpt.model
    teacher, before = ModelLoader().build(teacher_ckpt), ModelLoader().build(checkpoint.load(pruned))
    after = ModelLoader().build(student)
    with torch.no_grad():
        t = teacher(data.inputs).argmax(1)
        agree = [float((m(data.inputs).argmax(1) == t).float().mean()) for m in (before, after)]
    assert agree[1] > agree[0] + 0.3, agree  # measured: 0.20 -> 0.66
    pruned_w = formats.logical_tensors(checkpoint.load(pruned).tensors, checkpoint.load(pruned).encodings)
    trained = formats.logical_tensors(student.tensors, student.encodings)
    for name in ("net.1.weight", "net.3.weight", "net.5.weight"):
        assert torch.equal(trained[name] == 0, pruned_w[name] == 0), name  # the zeros stay zeros
        assert student.encodings[name]["codec"] == "sparse-bitmask", name  # and are stored sparse, as the student's were


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
        go(out, progress=StopAt(stop))
    st = state_path(out)
    assert st.exists() and not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    saved = train_state.load(st)
    assert (saved.epoch, saved.step) == divmod(stop, 6) and not saved.info["finished"]
    with safe_open(str(st), framework="pt") as f:  # a plain safetensors file: tensors + JSON metadata
        assert any(k.startswith("optim.") for k in f.keys()) and "infercomp.train_state" in f.metadata()
    go(out, resume=True)
    assert _sha(out) == _sha(ref)


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
