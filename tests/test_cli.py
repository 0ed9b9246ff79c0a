"""The command line: one-line errors with exit code 2, no tracebacks, nothing lost."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infercomp import checkpoint
from tests.conftest import DIGITS_TEST, SAMPLE, invoke, one_line_error, run_cli


def test_help_lists_commands(runner) -> None:
    r = invoke(runner, "--help")
    assert r.exit_code == 0
    for cmd in ("prune", "quantize", "distill", "report"):
        assert cmd in r.stdout
    for cmd in ("prune", "quantize", "distill", "report"):
        sub = invoke(runner, cmd, "--help")
        assert sub.exit_code == 0 and "--format" in sub.stdout


def test_missing_file(runner, tmp_path: Path) -> None:
    one_line_error(invoke(runner, "report", tmp_path / "nope.safetensors"), "nope.safetensors", "no such file")


def test_not_a_checkpoint(runner, tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("just some text")
    one_line_error(invoke(runner, "report", junk), "notes.txt", "not a checkpoint")


def test_truncated_safetensors(runner, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(SAMPLE["mlp"].read_bytes()[:5000])
    one_line_error(invoke(runner, "quantize", cut, "-o", tmp_path / "o.safetensors"), "cut.safetensors", "truncated or corrupt")
    assert not (tmp_path / "o.safetensors").exists()


def test_unknown_model_reference(runner) -> None:
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--model", "no-such-net"), "unknown model reference 'no-such-net'")


def test_untrusted_reference_names_the_flags(runner, tiny_ckpt: Path) -> None:
    one_line_error(
        invoke(runner, "report", tiny_ckpt), "tiny.safetensors", "not trusted", "--model tests.conftest:tiny_mlp", "--trust-model-code"
    )
    ok = invoke(runner, "report", tiny_ckpt, "--trust-model-code", "--min-time", "0.01", "--warmup", "1")
    assert ok.exit_code == 0, ok.output


def test_output_equals_input_is_refused(runner, tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    src.write_bytes(SAMPLE["mlp"].read_bytes())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    one_line_error(invoke(runner, "prune", src, "-o", src, "--force"), "output is the input")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


def test_existing_output_needs_force(runner, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    one_line_error(invoke(runner, "quantize", SAMPLE["mlp"], "-o", out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    r = invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, "--force", "--no-latency")
    assert r.exit_code == 0 and checkpoint.load(out).encodings


def test_bad_option_values(runner, tmp_path: Path) -> None:
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--format", "xml"), "--format 'xml'")
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--fail-if", "fast"), "--fail-if 'fast'")
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--model-config", "{bad"), "--model-config", "not valid JSON")
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--device", "cuda" if not _has_cuda() else "tpu"), "--device")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_bad_data_file(runner, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "d.safetensors"
    save_file({"x": torch.ones(2)}, str(bad))
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--data", bad), "d.safetensors", "no 'inputs'")
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--data", tmp_path / "none.npz"), "no such data file")


def test_debug_shows_traceback(runner, tmp_path: Path) -> None:
    r = invoke(runner, "report", tmp_path / "nope.safetensors", "--debug")
    assert r.exit_code == 2 and "Traceback" in r.stderr


def test_version(runner) -> None:
    r = invoke(runner, "--version")
    assert r.exit_code == 0 and r.stdout.startswith("infercomp ")


# ------------------------------------------------------------------------- real subprocesses


@pytest.mark.slow
def test_subprocess_error_is_one_line_exit_2(tmp_path: Path) -> None:
    p = run_cli("prune", tmp_path / "missing.pt", "-o", tmp_path / "o.safetensors")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "missing.pt: no such file" in p.stderr
    assert p.stdout == ""


@pytest.mark.slow
def test_subprocess_report_table_respects_no_color() -> None:
    p = run_cli("report", SAMPLE["mlp"], "--no-latency")
    assert p.returncode == 0 and "\x1b[" not in p.stdout and "digits_mlp.safetensors" in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_partial_output(tmp_path: Path, sig: int) -> None:
    """SIGINT / SIGTERM during a long run exits 130 and leaves neither output nor temp files."""
    out = tmp_path / "student.safetensors"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infercomp",
            "distill",
            SAMPLE["cnn"],
            "-o",
            out,
            "--data",
            DIGITS_TEST,
            "--student-model",
            "digits-cnn",
            "--epochs",
            "200",
            "--no-latency",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    time.sleep(8)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("cmd", ["prune", "quantize"])
def test_subprocess_transform_writes_and_prints_table(cmd: str, tmp_path: Path) -> None:
    out = tmp_path / f"{cmd}.safetensors"
    p = run_cli(cmd, SAMPLE["mlp"], "-o", out, "--data", DIGITS_TEST, "--min-time", "0.05", "--warmup", "1")
    assert p.returncode == 0, p.stderr
    assert out.exists() and str(out) in p.stdout and "accuracy" in p.stdout


def test_report_out_never_overwrites_a_checkpoint(runner, tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    src.write_bytes(SAMPLE["mlp"].read_bytes())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    r = invoke(runner, "quantize", src, "-o", tmp_path / "o.safetensors", "--report-out", src, "--no-latency")
    one_line_error(r, "--report-out", "looks like a checkpoint")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "o.safetensors").exists()  # refused before any work


def test_report_out_over_a_hugging_face_output_is_refused_before_any_work(runner, tmp_path: Path) -> None:
    """An output directory has no suffix to tell it from a report: the names are compared instead,
    before the transform runs (exit 2 leaves no output)."""
    out = tmp_path / "out"
    one_line_error(
        invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, "--report-out", out, "--no-latency"), "--report-out", "choose another path"
    )
    assert not out.exists()
    data = tmp_path / "data.json"
    data.write_bytes(b"[]")
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--data", data, "--report-out", data, "--no-latency"), "--report-out")
    assert data.read_bytes() == b"[]"


def test_plot_without_matplotlib_is_refused_before_any_work(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "o.safetensors"
    r = invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, "--plot", tmp_path / "t.png", "--no-latency")
    one_line_error(r, "--plot needs matplotlib")
    assert not out.exists()


def test_unwritable_report_out_is_a_one_line_error(runner, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--no-latency", "--report-out", blocker / "r.json"), "cannot write the report")


def test_malformed_gate_number(runner) -> None:
    one_line_error(invoke(runner, "report", SAMPLE["mlp"], "--fail-if", "accuracy>1.2.3"), "--fail-if")


# ------------------------------------------------------------------------- the tests themselves

CHECKED = ("exit_code", "returncode")


def _unchecked_cli_calls(source: str) -> list[str]:
    """Calls of invoke / run_cli (and subprocess.run / subprocess.Popen in test functions that run
    ``-m infercomp``) whose exit code is never looked at: neither ``.exit_code`` / ``.returncode`` of the result (before the name
    is reassigned) nor ``one_line_error(result, ...)``."""
    tree = ast.parse(source)
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bad = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
        nodes = list(ast.walk(fn))
        runs_cli = any(isinstance(n, ast.Constant) and n.value == "infercomp" for n in nodes)  # [python, -m, infercomp, ...]
        checks = [
            (n.lineno, n.value.id) for n in nodes if isinstance(n, ast.Attribute) and n.attr in CHECKED and isinstance(n.value, ast.Name)
        ]
        checks += [
            (n.lineno, n.args[0].id)
            for n in nodes
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "one_line_error" and n.args and isinstance(n.args[0], ast.Name)
        ]
        for call in (n for n in nodes if isinstance(n, ast.Call)):
            f = call.func
            cli = getattr(f, "id", "") in ("invoke", "run_cli") or (
                isinstance(f, ast.Attribute) and f.attr in ("run", "Popen") and getattr(f.value, "id", "") == "subprocess" and runs_cli
            )
            up = parent[call]
            if (
                not cli
                or (isinstance(up, ast.Attribute) and up.attr in CHECKED)
                or getattr(getattr(up, "func", None), "id", "") == "one_line_error"
            ):
                continue
            if isinstance(up, ast.Assign) and len(up.targets) == 1 and isinstance(up.targets[0], ast.Name):
                var = up.targets[0].id
                again = [
                    n.lineno
                    for n in nodes
                    if isinstance(n, ast.Assign) and n.lineno > up.lineno and any(getattr(t, "id", "") == var for t in n.targets)
                ]
                if any(up.lineno <= line <= min(again, default=line) and name == var for line, name in checks):
                    continue
            bad.append(f"{fn.name} (line {call.lineno})")
    return bad


def test_every_cli_call_in_the_tests_checks_its_exit_code() -> None:
    bad = {f.name: found for f in sorted(Path(__file__).parent.rglob("test_*.py")) if (found := _unchecked_cli_calls(f.read_text()))}
    assert not bad, f"CLI results whose exit code no test checks: {bad}"
    # and the check itself can fail
    sloppy = "def test_x(runner):\n    r = invoke(runner, 'report')\n    r = invoke(runner, 'prune')\n    assert r.exit_code == 0\n"
    assert _unchecked_cli_calls(sloppy) == ["test_x (line 2)"]
    assert _unchecked_cli_calls("def test_y():\n    run_cli('report')\n    subprocess.run(['x']).returncode\n") == ["test_y (line 2)"]
    assert _unchecked_cli_calls("def test_z():\n    subprocess.run([sys.executable, '-m', 'infercomp'])\n") == ["test_z (line 2)"]
    assert _unchecked_cli_calls("def test_w():\n    pid = subprocess.run(['true']).stdout\n") == []  # not the CLI


def test_progress_bars_keep_their_numbers_in_80_columns() -> None:
    """A long info line (distill's epoch, loss, samples/s) widened a column every bar shares: at 80
    columns the counts and times of all bars read "…". The words give way now, not the numbers."""
    from rich.console import Console

    from infercomp.commands.common import RichProgress

    p = RichProgress()
    p.bar.add_task("distill: digits_cnn.safetensors", total=None, info="")
    inner = p.bar.add_task("distilling", total=230, info="epoch 5/10 loss 0.06 samples/s 7081 and more words")
    p.bar.update(inner, completed=100)
    console = Console(record=True, width=80, color_system=None)
    console.print(p.bar.make_tasks_table(p.bar.tasks))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "100/230" in text and "0/?" in text and "epoch 5/10" in text
