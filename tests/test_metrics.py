"""metrics.py: accuracy, fidelity against a reference, SQNR (pure functions on tensors)."""

from __future__ import annotations

import pytest
import torch

from infercomp import metrics


def test_fidelity_identical_and_different() -> None:
    a = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    f = metrics.fidelity(a, a)
    assert f["top1_agreement"] == 1.0 and f["cosine_min"] == pytest.approx(1.0) and f["kl_div"] == pytest.approx(0.0, abs=1e-7)
    b = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    f = metrics.fidelity(b, a)
    assert f["top1_agreement"] == 0.5
    assert f["cosine_min"] == pytest.approx(0.8)  # (2+2)/5
    assert f["kl_div"] > 0


def test_fidelity_kl_is_of_the_reference_against_the_outputs() -> None:
    ref, out = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p = torch.softmax(ref, -1)[0]
    expected = float((p * (p / 0.5).log()).sum())  # KL(reference || outputs), outputs uniform
    f = metrics.fidelity(out, ref)
    assert f["kl_div"] == pytest.approx(expected, rel=1e-5)
    assert f["cosine_mean"] == pytest.approx(0.0, abs=1e-6)  # the zero vector: cosine 0, not NaN


def test_accuracy() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert metrics.accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_accuracy_ignores_unlabelled_samples() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert metrics.accuracy(logits, torch.tensor([0, -1, -1])) == 1.0
    assert metrics.accuracy(logits, torch.tensor([-1, -1, -1])) is None


def test_sqnr() -> None:
    ref = torch.ones(100)
    assert metrics.sqnr(ref, ref) is None
    assert metrics.sqnr(ref, ref * 1.1) == pytest.approx(20.0)
    assert metrics.sqnr(ref, ref * 1.01) == pytest.approx(40.0)
