"""Hostile and broken inputs, faults and interrupts: one clear line and exit 2 (3 for a bug of
ours), never a traceback, never a file left behind. Each test reproduces a failure once seen."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import infercomp
from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.errors import CheckpointError, DataError, GateFailed, ModelError
from infercomp.gates import check_gates
from infercomp.measure import Comparison, ModelReport
from infercomp.render import to_json
from tests.conftest import DIGITS_TEST, SAMPLE, invoke, one_line_error

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--no-latency", "-q")


def _cli(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infercomp", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300, **kw)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# 1. outputs never replace what is not a regular file
def test_output_onto_a_fifo_or_device_is_refused_even_with_force(runner, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, Path("/dev/null")):
        r = invoke(runner, "quantize", SAMPLE["mlp"], "-o", target, "--force", *FAST)
        one_line_error(r, str(target), "not a regular file")
    assert fifo.is_fifo() and Path("/dev/null").is_char_device()
    r = invoke(runner, "report", SAMPLE["mlp"], "--report-out", fifo, *FAST)
    assert r.exit_code == 2 and fifo.is_fifo()


@pytest.mark.slow
# 2. write failures are one line and exit 2
def test_parent_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _cli("quantize", SAMPLE["mlp"], "-o", blocker / "out.safetensors", *FAST)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot write" in proc.stderr
    assert _leftovers(tmp_path) == ["file"]


@pytest.mark.slow
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    def limit() -> None:  # a 20 kB file-size limit: the write fails as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "out.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "infercomp", "quantize", str(SAMPLE["cnn"]), "-o", str(out), *FAST],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        preexec_fn=limit,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "cannot write the checkpoint" in proc.stderr
    assert _leftovers(tmp_path) == []


# 3. validate before writing
def test_tensors_that_do_not_fit_the_model_leave_no_output(runner, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    r = invoke(runner, "prune", SAMPLE["mlp"], "-o", out, "--model", "digits-mlp", "--model-config", '{"hidden": [64]}', *FAST)
    one_line_error(r, str(out), "wrong --model", "nothing was written")
    assert not out.exists()


def test_untrusted_reference_leaves_no_output(runner, tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    ck = checkpoint.load(SAMPLE["mlp"])
    ck.model = {"ref": "evil_module:build", "config": {}}
    checkpoint.save(ck, src)
    out = tmp_path / "out.safetensors"
    r = invoke(runner, "quantize", src, "-o", out, *FAST)
    one_line_error(r, "not trusted", "--trust-model-code")
    assert not out.exists()


# 4. metadata validated against a schema
def _with_metadata(tmp_path: Path, info: object) -> Path:
    p = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(p), metadata={"format": "pt", "infercomp": json.dumps(info)})
    return p


@pytest.mark.parametrize(
    "info, needle",
    [
        ({"format_version": 1, "encodings": []}, "'encodings' must be an object"),
        ({"format_version": 1, "history": "yesterday"}, "'history' must be a list"),
        ({"format_version": 1, "model": {"ref": 5}}, "'model' must be null"),
        ({"format_version": 1, "model": {"ref": "digits-mlp", "config": [1]}}, "'model' must be null"),
        ({"format_version": 1, "encodings": {"x.weight": {"codec": "int8", "shape": [10**9, 10**9]}}}, "absurdly large"),
        ({"format_version": 1, "encodings": {"x.weight": {"codec": "int8", "shape": "2x2"}}}, "'shape' must be a list"),
        ({"format_version": 1, "encodings": {"x.weight": 7}}, "must be an object with a 'codec'"),
        ({"format_version": True}, "integer format_version"),
    ],
)
def test_malformed_metadata_is_one_clear_error(tmp_path: Path, info: object, needle: str) -> None:
    with pytest.raises(CheckpointError, match=needle):
        checkpoint.load(_with_metadata(tmp_path, info))


def test_deeply_nested_metadata(tmp_path: Path) -> None:
    deep = '{"format_version": 1, "plan": ' + "[" * 5000 + "]" * 5000 + "}"
    p = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(1)}, str(p), metadata={"infercomp": deep})
    with pytest.raises(CheckpointError, match="nested too deeply|nested deeper"):
        checkpoint.load(p)


def test_zip_named_safetensors_and_crafted_headers(runner, tmp_path: Path) -> None:
    z = tmp_path / "model.safetensors"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("data.pkl", b"\x80\x04N.")
    r = invoke(runner, "report", z, *FAST)
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    huge = tmp_path / "huge.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}).encode()
    huge.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    r = invoke(runner, "report", huge, *FAST)
    assert r.exit_code == 2 and "Traceback" not in r.stderr


def test_encoded_parts_that_do_not_fit_their_spec(tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    infercomp.quantize(SAMPLE["mlp"], out, scheme="int8", measure=False)
    ck = checkpoint.load(out)
    ck.tensors["net.1.weight_scale"] = torch.ones(3, 7, dtype=torch.float16)  # wrong number of scales
    bad = tmp_path / "bad.safetensors"
    checkpoint.save(ck, bad)
    with pytest.raises(CheckpointError, match="cannot be decoded"):
        infercomp.load(bad)


# 5. a stored model config cannot make us allocate unbounded memory
def test_config_that_builds_far_more_than_stored_is_refused(tmp_path: Path) -> None:
    ck = checkpoint.load(SAMPLE["mlp"])
    ck.model = {"ref": "digits-mlp", "config": {"hidden": [1_000_000, 1_000_000]}}
    p = tmp_path / "bomb.safetensors"
    checkpoint.save(ck, p)
    with pytest.raises(ModelError, match="refusing to allocate"):
        infercomp.load(p)


# 6. model and data that do not fit
def test_data_the_model_cannot_take_names_file_and_shape(runner, tmp_path: Path) -> None:
    data = tmp_path / "wrong.safetensors"
    save_file({"inputs": torch.rand(8, 3, 5, 5), "labels": torch.zeros(8, dtype=torch.long)}, str(data))
    r = invoke(runner, "report", SAMPLE["cnn"], "--data", data, *FAST)
    one_line_error(r, str(data), "(3, 5, 5)")


# 7. non-finite numbers are never silent
def test_nan_weights_refused_unless_allowed(runner, tmp_path: Path) -> None:
    ck = checkpoint.load(SAMPLE["mlp"])
    ck.tensors["net.1.weight"][0, 0] = float("nan")
    src = tmp_path / "nan.safetensors"
    checkpoint.save(ck, src)
    out = tmp_path / "out.safetensors"
    r = invoke(runner, "quantize", src, "-o", out, *FAST)
    one_line_error(r, "net.1.weight", "NaN", "--allow-nonfinite")
    assert not out.exists()
    r = invoke(runner, "quantize", src, "-o", out, "--allow-nonfinite", "--data", DIGITS_TEST, "-f", "json", *FAST)
    assert r.exit_code == 0, r.output
    assert "NaN" not in r.stdout and "Infinity" not in r.stdout
    json.loads(r.stdout)


def test_gate_on_a_nan_figure_fails() -> None:
    c = Comparison(settings={}, models=[ModelReport(path="a"), ModelReport(path="b", fidelity={"cosine_min": float("nan")})])
    with pytest.raises(GateFailed, match="cosine_min is nan"):
        check_gates(c, ["cosine_min<0.99"])
    doc = json.loads(to_json(c))
    assert doc["models"][1]["fidelity"]["cosine_min"] is None and "fidelity.cosine_min" in doc["models"][1]["notes"][0]


def test_nan_data_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "nan.safetensors"
    x = torch.rand(4, 1, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    save_file({"inputs": x}, str(data))
    with pytest.raises(DataError, match="NaN or infinite"):
        infercomp.report([SAMPLE["mlp"]], data=data, latency=False)


# 8. labels out of the model's range
def test_labels_beyond_the_classes_are_exit_2(runner, tmp_path: Path) -> None:
    data = tmp_path / "labels.safetensors"
    save_file({"inputs": torch.rand(8, 1, 8, 8), "labels": torch.full((8,), 99, dtype=torch.long)}, str(data))
    r = invoke(runner, "report", SAMPLE["mlp"], "--data", data, *FAST)
    one_line_error(r, "'labels' go up to 99", "10 class scores")


# 9. bounded options
def test_threads_above_the_cores_are_clamped_and_min_time_must_be_finite(runner) -> None:
    r = invoke(runner, "report", SAMPLE["mlp"], "--threads", "100000", "--min-time", "0.01", "--warmup", "1", "-f", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["threads"] <= (os.cpu_count() or 1)
    assert "more than this machine" in r.stderr
    r = invoke(runner, "report", SAMPLE["mlp"], "--min-time", "inf")
    assert r.exit_code == 2 and "finite" in r.stderr


# 10. distinct exit codes
def test_an_internal_error_exits_3_with_one_line(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(infercomp.api, "compare", boom)
    r = invoke(runner, "report", SAMPLE["mlp"], *FAST)
    assert r.exit_code == 3
    assert "internal error: ZeroDivisionError: a bug" in r.stderr and "--debug" in r.stderr and "Traceback" not in r.stderr


# 11. leftovers of a killed run are cleaned up by the next one
def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.safetensors.{dead}.tmp"
    stale.write_bytes(b"half a file")
    alive = tmp_path / f".out.safetensors.{os.getppid()}.tmp"  # a live process's file stays
    alive.write_bytes(b"in progress")
    checkpoint.save(Checkpoint(tensors={"w": torch.zeros(2)}), out)
    assert not stale.exists() and alive.exists()


# 12. determinism across thread counts
@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [("quantize", "--scheme", "int4", "--method", "gptq"), ("prune", "--method", "wanda"), ("prune", "--method", "sparsegpt")]
)
def test_same_bytes_whatever_the_thread_count(tmp_path: Path, args: tuple[str, ...]) -> None:
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.safetensors"
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        proc = _cli(args[0], SAMPLE["cnn"], "-o", out, *args[1:], "--data", DIGITS_TEST, *FAST, env=env)
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# 10b. an interrupt while Python is still importing torch
@pytest.mark.parametrize("launcher", ["script", "-m"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_start_up_is_one_line_and_130(tmp_path: Path, sig: int, launcher: str) -> None:
    """The console script users run, and ``python -m infercomp``."""
    script = Path(sys.executable).parent / "infercomp"
    if launcher == "script" and not script.exists():
        pytest.skip("the infercomp console script is not installed next to this Python")
    cmd = [str(script)] if launcher == "script" else [sys.executable, "-m", "infercomp"]
    proc = subprocess.Popen([*cmd, "report", str(SAMPLE["mlp"])], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(0.15)  # well inside the import of torch (about a second here)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err
