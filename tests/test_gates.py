"""gates.py: ``--fail-if`` conditions on a comparison (exit 1 in CI)."""

from __future__ import annotations

import pytest

from infercomp import gates
from infercomp.errors import GateFailed, UsageError
from infercomp.measure import Comparison, ModelReport


def _cmp(**after) -> Comparison:
    base = ModelReport(path="a", accuracy=0.99, ratios={"size": 1.0, "latency": 1.0})
    return Comparison(settings={}, models=[base, ModelReport(path="b", **after)])


def test_gates() -> None:
    gates.check_gates(_cmp(accuracy_drop=0.001, ratios={"size": 0.3}), ["accuracy_drop>0.01", "size_ratio>0.5"])
    with pytest.raises(GateFailed, match=r"b: accuracy_drop = 0.02 \(accuracy_drop>0.01\)") as e:
        gates.check_gates(_cmp(accuracy_drop=0.02), ["accuracy_drop>0.01"])
    assert e.value.exit_code == 1
    with pytest.raises(GateFailed, match="latency_ratio was not measured"):
        gates.check_gates(_cmp(ratios={"latency": None}), ["latency_ratio>0.9"])
    with pytest.raises(UsageError, match="KEY OP NUMBER"):
        gates.parse_gate("speed is good")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("accuracy_drop>0.01", ("accuracy_drop", ">", 0.01)),
        (" size_ratio <= 0.5 ", ("size_ratio", "<=", 0.5)),
        ("cosine_min<0.99", ("cosine_min", "<", 0.99)),
        ("sparsity>=1e-3", ("sparsity", ">=", 0.001)),
        ("bits_per_weight==32", ("bits_per_weight", "==", 32.0)),
        ("accuracy<-1", ("accuracy", "<", -1.0)),
    ],
)
def test_parse_gate(text: str, parsed: tuple[str, str, float]) -> None:
    assert gates.parse_gate(text) == parsed


@pytest.mark.parametrize("text", ["latency>2", "accuracy_drop>1.2.3", "accuracy_drop=>0.1", "accuracy_drop>"])
def test_bad_gates_name_the_keys(text: str) -> None:
    with pytest.raises(UsageError, match=f"--fail-if '{text}'.*accuracy_drop, sparsity"):
        gates.parse_gate(text)


def test_every_failing_gate_is_named_and_the_baseline_is_not_judged() -> None:
    c = _cmp(
        accuracy=0.5, accuracy_drop=0.49, ratios={"size": 0.9}, fidelity={"top1_agreement": 0.5, "cosine_mean": 0.9, "cosine_min": 0.1}
    )
    c.models.append(ModelReport(path="c", accuracy=0.98, accuracy_drop=0.01, ratios={"size": 0.2}))
    with pytest.raises(GateFailed) as e:
        gates.check_gates(c, ["accuracy<0.9", "size_ratio>0.5", "top1_agreement<0.9", "cosine_min<0.5"])
    assert str(e.value) == "gate failed: " + "; ".join(
        [
            "b: accuracy = 0.5 (accuracy<0.9)",
            "b: size_ratio = 0.9 (size_ratio>0.5)",
            "b: top1_agreement = 0.5 (top1_agreement<0.9)",
            "c: top1_agreement was not measured (gate 'top1_agreement<0.9')",
            "b: cosine_min = 0.1 (cosine_min<0.5)",
            "c: cosine_min was not measured (gate 'cosine_min<0.5')",
        ]
    )  # the baseline a (0.99 accuracy) is what the others are judged against, never judged itself


def test_gate_on_fidelity_without_data_fails() -> None:
    with pytest.raises(GateFailed, match="b: cosine_mean was not measured"):
        gates.check_gates(_cmp(fidelity=None), ["cosine_mean<0.99"])
