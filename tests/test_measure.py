"""measure.py: static statistics, timing summaries, interleaved timing, options, and compare() on the
trained sample models (numbers match reality)."""

from __future__ import annotations

import pytest
import torch

from infercomp import api, checkpoint, measure
from infercomp.checkpoint import Checkpoint
from infercomp.errors import UsageError
from infercomp.models import ModelLoader
from infercomp.prune import PruneConfig, prune
from infercomp.transform import Context
from tests.conftest import DIGITS_TEST, KNOWN_ACCURACY, SAMPLE


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


def test_measure_options_validate() -> None:
    with pytest.raises(UsageError, match="--batch-size"):
        measure.MeasureOptions(batch_size=0)
    with pytest.raises(UsageError, match="--device 'tpu'"):
        measure.MeasureOptions(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            measure.MeasureOptions(device="cuda").torch_device()


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_untouched_sample_reports_its_known_accuracy_and_real_size(name: str) -> None:
    c = api.report([SAMPLE[name]], data=DIGITS_TEST, min_time=0.05, warmup=1)
    m = c.models[0]
    assert m.accuracy == pytest.approx(KNOWN_ACCURACY[name], abs=6e-4)
    assert m.size_bytes == SAMPLE[name].stat().st_size
    assert m.ratios == {"size": 1.0, "parameters": 1.0, "latency": 1.0}
    assert m.fidelity["top1_agreement"] == 1.0 and m.accuracy_drop == 0.0
    assert m.latency_ms["median"] > 0 and m.latency_ms["p90"] >= m.latency_ms["median"]
    assert m.throughput_per_s == pytest.approx(32 / (m.latency_ms["median"] / 1000))
    assert m.sparsity == 0.0 and m.bits_per_weight == 32.0


def test_parameters_match_the_module() -> None:
    module = api.load(SAMPLE["cnn"])
    c = api.report([SAMPLE["cnn"]], latency=False)
    assert c.models[0].parameters == sum(p.numel() for p in module.parameters())


def test_layers_view_has_a_row_per_weight_matrix() -> None:
    base = checkpoint.load(SAMPLE["mlp"])
    pruned = prune(base, PruneConfig(sparsity=0.5, scope="layer"), Context(loader=ModelLoader(), data=None, device=torch.device("cpu")))
    c = measure.compare([base, pruned], loader=ModelLoader(), options=measure.MeasureOptions(latency=False, layers=True))
    base_rows, rows = c.models[0].layers, c.models[1].layers
    assert [r["name"] for r in rows] == [r["name"] for r in base_rows] == ["net.1.weight", "net.3.weight", "net.5.weight"]
    for b, r in zip(base_rows, rows):
        assert b["sqnr_db"] is None and b["sparsity"] == 0.0 and b["stored"] == "float32"
        assert r["stored"] == "sparse-bitmask" and r["sparsity"] == pytest.approx(0.5, abs=0.01) and r["bytes"] < b["bytes"]
        assert r["sqnr_db"] is not None and 0 < r["sqnr_db"] < 20  # half the weights gone: far from exact
