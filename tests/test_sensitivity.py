"""report --sensitivity: one layer at a time, ranked, and an exclude list that is measured to fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import infercomp
from infercomp import checkpoint
from infercomp.data import load_data
from infercomp.errors import UsageError
from infercomp.models import ModelLoader
from infercomp.sensitivity import analyse, parse_spec
from tests.conftest import DIGITS_TEST, SAMPLE, invoke, one_line_error


def test_specs() -> None:
    assert parse_spec("quantize:int4").scheme == "int4"
    cfg = parse_spec("prune:magnitude:0.5")
    assert cfg.method == "magnitude" and cfg.sparsity == 0.5 and cfg.scope == "layer"
    assert parse_spec("prune:channel:0.3").method == "channel"
    for bad in ("quantize:int3", "prune:wanda:0.5", "prune:magnitude:lots", "distill"):
        with pytest.raises(UsageError, match="--sensitivity"):
            parse_spec(bad)


@pytest.mark.slow
def test_ranking_and_a_suggestion_that_holds(tmp_path: Path) -> None:
    s = analyse(
        checkpoint.load(SAMPLE["transformer"]), "prune:magnitude:0.6", loader=ModelLoader(), data=load_data(DIGITS_TEST), max_drop=0.005
    )
    drops = [r["drop"] for r in s.layers]
    assert [r["name"] for r in s.layers] and drops == sorted(drops, reverse=True)
    assert s.metric == "accuracy_drop" and s.drop_all is not None and s.drop_all > 0.1  # 60 % everywhere hurts
    assert s.suggested_exclude and s.drop_with_exclude is not None and s.drop_with_exclude <= 0.005
    # The promise, checked the way a user would: prune with that exclude list.
    r = infercomp.prune(
        SAMPLE["transformer"],
        tmp_path / "p.safetensors",
        method="magnitude",
        sparsity=0.6,
        scope="layer",
        exclude=s.suggested_exclude,
        data=DIGITS_TEST,
        latency=False,
    )
    assert r.models[1].accuracy_drop <= 0.005
    assert r.models[1].sparsity > 0  # something was still pruned


def test_cli_json_and_its_errors(runner) -> None:
    r = invoke(runner, "report", SAMPLE["mlp"], "--data", DIGITS_TEST, "--sensitivity", "quantize:int4", "--no-latency", "-f", "json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["sensitivity"]
    assert s["spec"] == "quantize:int4" and {row["name"] for row in s["layers"]} == {"net.1", "net.3", "net.5"}
    assert s["max_drop"] == 0.005 and "suggested_exclude" in s and "drop_with_exclude" in s
    r = invoke(runner, "report", SAMPLE["mlp"], "--sensitivity", "quantize:int4", "--no-latency")
    one_line_error(r, "--sensitivity", "--data")


@pytest.mark.slow
def test_the_top_layer_really_drops_most_on_the_mlp(tmp_path: Path) -> None:
    """Re-measured independently: compressing the top-ranked layer alone costs at least as much as
    compressing any other layer alone."""
    s = analyse(checkpoint.load(SAMPLE["mlp"]), "prune:magnitude:0.9", loader=ModelLoader(), data=load_data(DIGITS_TEST))
    drops = {}
    for row in s.layers:
        r = infercomp.prune(
            SAMPLE["mlp"],
            tmp_path / f"{row['name']}.safetensors",
            method="magnitude",
            sparsity=0.9,
            scope="layer",
            include=[row["name"]],
            data=DIGITS_TEST,
            latency=False,
        )
        drops[row["name"]] = r.models[1].accuracy_drop
    top = s.layers[0]["name"]
    assert drops[top] == max(drops.values()) and drops[top] > 0
    assert drops[top] == pytest.approx(s.layers[0]["drop"])
