"""Measurement units on tiny tensors: statistics, summaries, fidelity, interleaved timing, gates."""

from __future__ import annotations

import pytest
import torch

from infercomp import gates, measure
from infercomp.checkpoint import Checkpoint
from infercomp.errors import GateFailed, UsageError
from infercomp.measure import Comparison, ModelReport


def test_static_stats_counts_weights_not_statistics() -> None:
    ck = Checkpoint(
        tensors={
            "fc.weight": torch.tensor([[0.0, 1.0], [2.0, 0.0]]),
            "fc.bias": torch.tensor([1.0, 1.0]),
            "bn.running_mean": torch.zeros(2),
            "bn.running_var": torch.ones(2),
            "bn.num_batches_tracked": torch.tensor(3),
            "emb.weight": torch.ones(2, 2).half(),
        }
    )
    s = measure.static_stats(ck)
    assert s["parameters"] == 4 + 2 + 4
    assert s["nonzero"] == 2 + 2 + 4
    assert s["sparsity"] == pytest.approx(2 / 10)
    assert s["bits_per_weight"] == pytest.approx((6 * 32 + 4 * 16) / 10)
    assert s["dtypes"] == {"float16": pytest.approx(0.4), "float32": pytest.approx(0.6)}


def test_summarise_median_and_p90() -> None:
    s = measure.summarise([i / 1000 for i in range(1, 11)])  # 1..10 ms
    assert s["median"] == pytest.approx(5.5) and s["p90"] == pytest.approx(9.0) and s["runs"] == 10


def test_fidelity_identical_and_different() -> None:
    a = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    f = measure.fidelity(a, a)
    assert f["top1_agreement"] == 1.0 and f["cosine_min"] == pytest.approx(1.0) and f["kl_div"] == pytest.approx(0.0, abs=1e-7)
    b = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    f = measure.fidelity(b, a)
    assert f["top1_agreement"] == 0.5
    assert f["cosine_min"] == pytest.approx(0.8)  # (2+2)/5
    assert f["kl_div"] > 0


def test_accuracy() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert measure.accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_time_interleaved_shuffles_and_respects_minimums() -> None:
    order: list[int] = []
    fns = [lambda: order.append(0), lambda: order.append(1), lambda: order.append(2)]
    times = measure.time_interleaved(fns, device=torch.device("cpu"), warmup=2, min_time=0.0, min_runs=6)
    assert [len(t) for t in times] == [6, 6, 6]
    assert order[:6] == [0, 0, 1, 1, 2, 2]  # warm-up of each
    rounds = [order[6 + 3 * r : 9 + 3 * r] for r in range(6)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)  # each model once per round
    predecessors = {(r[k - 1], r[k]) for r in rounds for k in range(1, 3)}
    assert len(predecessors) > 3  # neighbours change between rounds (a rotation keeps them fixed)


def test_sqnr() -> None:
    ref = torch.ones(100)
    assert measure.sqnr(ref, ref) is None
    assert measure.sqnr(ref, ref * 1.1) == pytest.approx(20.0)


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


def test_measure_options_validate() -> None:
    with pytest.raises(UsageError, match="--batch-size"):
        measure.MeasureOptions(batch_size=0)
    with pytest.raises(UsageError, match="--device 'tpu'"):
        measure.MeasureOptions(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            measure.MeasureOptions(device="cuda").torch_device()


def test_accuracy_ignores_unlabelled_samples() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert measure.accuracy(logits, torch.tensor([0, -1, -1])) == 1.0
    assert measure.accuracy(logits, torch.tensor([-1, -1, -1])) is None
