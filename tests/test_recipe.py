"""infercomp run RECIPE.yaml: steps, make-like skipping, re-running from a changed step, failures,
unknown keys named by line, and the final history holding every step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from infercomp import checkpoint
from infercomp.errors import GateFailed, UsageError
from infercomp.recipe import STATE, load, run
from infercomp.version import __version__
from tests.conftest import DIGITS_TEST, SAMPLE, invoke, one_line_error

RECIPE = """\
model: {model}
out: out
steps:
  - name: sparse
    prune: {{method: magnitude, sparsity: {sparsity}}}
  - name: small
    quantize: {{scheme: {scheme}}}
  - name: check
    report:
      checkpoints: [model, small]
      data: {data}
      no_latency: true
      fail_if: ["accuracy_drop>{budget}"]
"""


def _write(tmp_path: Path, *, sparsity: float = 0.5, scheme: str = "int8", budget: float = 0.05) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(RECIPE.format(model=SAMPLE["mlp"], data=DIGITS_TEST, sparsity=sparsity, scheme=scheme, budget=budget))
    return p


def _ran(results) -> dict[str, bool]:
    return {r.name: r.ran for r in results}


@pytest.mark.slow
def test_steps_run_then_skip_then_rerun_from_a_changed_option(tmp_path: Path) -> None:
    results = run(load(_write(tmp_path)))
    assert _ran(results) == {"sparse": True, "small": True, "check": True}
    final = checkpoint.load(tmp_path / "out" / "small.safetensors")
    assert [h["transform"] for h in final.history] == ["prune", "quantize"]  # every step that led to it
    stamp = (tmp_path / "out" / "small.safetensors").stat().st_mtime_ns
    assert _ran(run(load(_write(tmp_path)))) == {"sparse": False, "small": False, "check": True}  # like make: no work
    assert (tmp_path / "out" / "small.safetensors").stat().st_mtime_ns == stamp
    assert _ran(run(load(_write(tmp_path, scheme="int4")))) == {"sparse": False, "small": True, "check": True}
    assert _ran(run(load(_write(tmp_path, sparsity=0.6, scheme="int4")))) == {"sparse": True, "small": True, "check": True}


def test_outputs_of_another_infercomp_version_are_not_cached_ones(tmp_path: Path) -> None:
    """A new version may transform differently (a default, a format): its steps run again."""
    run(load(_write(tmp_path)))
    state = tmp_path / "out" / STATE
    recorded = json.loads(state.read_text())
    assert recorded["sparse"]["infercomp_version"] == __version__
    for fingerprint in recorded.values():
        if fingerprint is not None:  # the report step is not cached
            fingerprint["infercomp_version"] = "0.0.1"  # as an older infercomp wrote it
    state.write_text(json.dumps(recorded))
    assert _ran(run(load(_write(tmp_path)))) == {"sparse": True, "small": True, "check": True}
    assert _ran(run(load(_write(tmp_path)))) == {"sparse": False, "small": False, "check": True}


def test_a_failing_step_is_named_and_earlier_outputs_stay(tmp_path: Path) -> None:
    run(load(_write(tmp_path)))
    before = (tmp_path / "out" / "sparse.safetensors").read_bytes()
    with pytest.raises(UsageError, match=r"step 2 \(small, quantize, line 6\).*--scheme 'int3'"):
        run(load(_write(tmp_path, sparsity=0.7, scheme="int3")))
    assert (tmp_path / "out" / "sparse.safetensors").read_bytes() != before  # step 1 ran with its new option
    assert (tmp_path / "out" / "small.safetensors").exists()  # the last good output of step 2 is untouched
    with pytest.raises(GateFailed, match=r"step 3 \(check, report, line 8\).*accuracy_drop"):
        run(load(_write(tmp_path, budget=-1)))


def test_unknown_keys_name_their_line(tmp_path: Path, runner) -> None:
    p = _write(tmp_path).read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(p.replace("prune: {method: magnitude, sparsity: 0.5}", "prune: {method: magnitude, sparsty: 0.5}"))
    with pytest.raises(UsageError, match=r"bad.yaml:5: unknown option 'sparsty' for prune"):
        load(bad)
    bad.write_text(p.replace("out: out", "output: out"))
    with pytest.raises(UsageError, match=r"bad.yaml:2: unknown key 'output'"):
        load(bad)
    r = invoke(runner, "run", bad)
    one_line_error(r, "unknown key 'output'")


def test_cli_runs_the_recipe(tmp_path: Path, runner) -> None:
    r = invoke(runner, "run", _write(tmp_path), "-q")
    assert r.exit_code == 0, r.output
    assert "step sparse (prune): ran" in r.stderr and "small.safetensors" in r.stdout
    r = invoke(runner, "run", _write(tmp_path, budget=-1), "-q")
    assert r.exit_code == 1 and "up to date, skipped" in r.stderr and "gate failed" in r.stderr


def _one_step(tmp_path: Path, step: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"model: {SAMPLE['cnn']}\nout: out\nsteps:\n{step}")
    return p


def test_a_tightened_gate_is_checked_although_nothing_else_changed(tmp_path: Path) -> None:
    step = "  - name: q\n    quantize: {{scheme: int4, data: {d}, no_latency: true, fail_if: ['size_ratio>{b}']}}\n"
    p = _one_step(tmp_path, step.format(d=DIGITS_TEST, b=0.5))
    assert _ran(run(load(p))) == {"q": True}
    assert _ran(run(load(p))) == {"q": False}
    p.write_text(p.read_text().replace("size_ratio>0.5", "size_ratio>0.1"))
    with pytest.raises(GateFailed, match="size_ratio"):
        run(load(p))


def test_up_to_date_whatever_the_recipe_path_is_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    model, data = (os.path.relpath(f, tmp_path / "sub") for f in (SAMPLE["cnn"], DIGITS_TEST))  # as written by hand
    p = tmp_path / "sub" / "r.yaml"
    p.write_text(f"model: {model}\nout: out\nsteps:\n  - name: q\n    quantize: {{scheme: int8, eval_data: {data}}}\n")
    assert _ran(run(load(p))) == {"q": True}
    monkeypatch.chdir(tmp_path)
    assert _ran(run(load(Path("sub/r.yaml")))) == {"q": False}
    monkeypatch.chdir(tmp_path / "sub")
    assert _ran(run(load(Path("r.yaml")))) == {"q": False}


def test_a_distill_steps_input_is_its_student(tmp_path: Path) -> None:
    steps = (
        "  - name: half\n    prune: {method: channel, sparsity: 0.5}\n"
        "  - name: quarter\n    input: model\n    prune: {method: channel, sparsity: 0.25}\n"
        f"  - name: small\n    input: half\n    distill: {{data: {DIGITS_TEST}, epochs: 1}}\n"
    )
    run(load(_one_step(tmp_path, steps)))
    out = tmp_path / "out"
    shape = checkpoint.load(out / "small.safetensors").tensors["features.0.weight"].shape
    assert shape == checkpoint.load(out / "half.safetensors").tensors["features.0.weight"].shape
    clash = f"  - name: s\n    input: model\n    distill: {{data: {DIGITS_TEST}, student: model, epochs: 1}}\n"
    with pytest.raises(UsageError, match="not both"):
        run(load(_one_step(tmp_path, clash, "clash.yaml")))


@pytest.mark.parametrize("name", ["../escaped", "sub/x", ".hidden"])
def test_step_names_stay_inside_out(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="step name"):
        load(_one_step(tmp_path, f"  - name: '{name}'\n    quantize: {{scheme: int8}}\n"))


def test_json_lines_one_report_per_measured_step(tmp_path: Path, runner) -> None:
    steps = (
        f"  - name: q\n    quantize: {{scheme: int8, data: {DIGITS_TEST}, no_latency: true, fail_if: ['size_ratio>0.9']}}\n"
        f"  - name: r\n    report: {{checkpoints: [model, q], data: {DIGITS_TEST}, no_latency: true}}\n"
    )
    r = invoke(runner, "run", _one_step(tmp_path, steps), "--format", "json")
    assert r.exit_code == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["step"] for d in docs] == ["q", "r"] and all(d["schema"] == "infercomp.report/1" for d in docs)


def test_a_step_cut_short_is_not_up_to_date_for_its_old_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options A ran; B was started and cut short after writing its output. Back at A, the file
    is B's: the step must run again, not be skipped on A's old fingerprint."""
    import infercomp.recipe as recipe

    p = _one_step(tmp_path, "  - name: q\n    quantize: {scheme: int8}\n")
    assert _ran(run(load(p))) == {"q": True}
    p.write_text(p.read_text().replace("int8", "int4"))

    def cut_short(source, out, **kwargs):
        Path(out).write_bytes(b"B's output")
        raise KeyboardInterrupt

    r = load(p)  # checked against the real verb's options
    monkeypatch.setitem(recipe.VERBS, "quantize", cut_short)
    with pytest.raises(KeyboardInterrupt):
        run(r)
    monkeypatch.undo()
    p.write_text(p.read_text().replace("int4", "int8"))
    assert _ran(run(load(p))) == {"q": True}
