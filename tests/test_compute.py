"""Compute modes: storage and compute chosen apart; auto chooses by measuring, never slower than fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infercomp
from infercomp import compute
from infercomp.compute import allowed_modes, prepare
from infercomp.errors import UsageError
from infercomp.kernels import Int8Linear, Int8Weight, KernelCache
from infercomp.metrics import sqnr
from tests.conftest import DIGITS_TEST, SAMPLE, invoke

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCOMP_CACHE_DIR", str(tmp_path / "cache"))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.LayerNorm(256), nn.Linear(256, 8)).eval()


def _out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return m(x)


def test_allowed_modes_follow_the_storage() -> None:
    assert allowed_modes({"float32"}) == ("fp32",)  # exact stays exact under auto
    assert allowed_modes({"float32", "int8"}) == ("fp32", "bf16")
    assert allowed_modes({"int4", "float32"}) == ("fp32", "bf16")
    assert allowed_modes({"bfloat16"}) == ("fp32", "bf16")
    assert allowed_modes({"int8-dynamic", "float32"}) == ("fp32", "bf16", "int8")
    with pytest.raises(UsageError, match="--compute 'fast'"):
        compute.check_mode("fast")


def test_fp32_changes_nothing_and_bf16_runs_in_bf16() -> None:
    x = torch.randn(16, 256)
    ref = _out(_mlp(), x)
    same, info = prepare(_mlp(), "fp32", example=x)
    assert info.mode == "fp32" and torch.equal(_out(same, x), ref)
    half, info = prepare(_mlp(), "bf16", example=x)
    assert info.mode == "bf16" and all(p.dtype == torch.bfloat16 for p in half.parameters())
    y = _out(half, x)
    assert y.dtype == torch.float32  # callers see float32, as before
    assert sqnr(ref, y) > 25 and not torch.equal(y, ref)
    assert info.kernels["0"] == "bf16 linear"


def test_int8_replaces_large_linear_layers_only() -> None:
    x = torch.randn(40, 256)
    ref = _out(_mlp(), x)
    m, info = prepare(_mlp(), "int8", example=x)
    assert isinstance(m[0], Int8Linear) and isinstance(m[2], Int8Linear)
    assert type(m[4]) is nn.Linear  # 256 x 8 is below SMALL_LINEAR: stays float
    assert info.mode in ("int8", "int8+bf16") and set(info.trial_ms) <= {"int8", "int8+bf16"}
    assert sqnr(ref, _out(m, x)) > 20
    # Each int8 layer chose, by timing its shape, an int8 kernel or the float path with its int8
    # weights dequantized; the small layer is a plain float Linear.
    assert all(k.startswith(("int8_", "fp32 linear (int8", "bf16 linear (int8")) for k in info.kernels["0"].split("+"))
    assert info.kernels["4"] in ("fp32 linear", "bf16 linear")


def test_int8_uses_the_stored_integers() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(512, 256)
    stored = Int8Weight.from_float(lin.weight.detach())
    stored.wq[0, 0] = 99  # a value float weights would never requantize to: proves which ints run
    m = nn.Sequential(lin)
    m, _ = prepare(m, "int8", int8_weights={"0": stored})
    assert isinstance(m[0], Int8Linear) and torch.equal(m[0].w.wq, stored.wq)
    assert m[0].w.bias is not None  # the layer's bias comes along


def _fake_times(table: dict[str, float], calls: list[int]):
    """A stand-in for timing.time_interleaved: ``table`` gives each variant's seconds per call,
    in the order the trial passes them (we recover the order from the call's length)."""

    def fake(fns, **kwargs):
        del kwargs
        calls.append(len(fns))
        return [[t] * 5 for t in table.values()][: len(fns)]

    return fake


def test_auto_picks_the_measured_fastest_and_keeps_fp32_on_a_near_tie(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(8, 256)
    calls: list[int] = []
    monkeypatch.setattr(compute, "time_interleaved", _fake_times({"fp32": 0.010, "bf16": 0.004}, calls))
    cache = KernelCache(tmp_path / "k.json")
    _, info = prepare(_mlp(), "auto", example=x, allowed=("fp32", "bf16"), cache=cache)
    assert info.mode == "bf16" and info.trial_ms == {"fp32": 10.0, "bf16": 4.0} and not info.cached
    # The same model and input shape again: the cache answers, nothing is timed.
    _, again = prepare(_mlp(seed=3), "auto", example=torch.randn(8, 256), allowed=("fp32", "bf16"), cache=KernelCache(tmp_path / "k.json"))
    assert again.mode == "bf16" and again.cached and calls == [2]
    # Another input shape is another key; a candidate within 5 % of fp32 does not replace it.
    monkeypatch.setattr(compute, "time_interleaved", _fake_times({"fp32": 0.010, "bf16": 0.0097}, calls))
    _, near = prepare(_mlp(), "auto", example=torch.randn(64, 256), allowed=("fp32", "bf16"), cache=cache)
    assert near.mode == "fp32" and calls == [2, 2]


def test_corrupt_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "k.json"
    path.write_text('{"truncated": ')
    monkeypatch.setattr(compute, "time_interleaved", _fake_times({"fp32": 0.002, "bf16": 0.001}, []))
    _, info = prepare(_mlp(), "auto", example=torch.randn(4, 256), allowed=("fp32", "bf16"), cache=KernelCache(path))
    assert info.mode == "bf16"
    assert len(json.loads(path.read_text())) == 1  # rewritten, valid


def test_auto_without_an_example_stays_fp32() -> None:
    m, info = prepare(_mlp(), "auto", example=None, allowed=("fp32", "bf16"))
    assert info.mode == "fp32" and "no example input" in (info.note or "")
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_load_runs_the_chosen_mode(tmp_path: Path) -> None:
    out = tmp_path / "mlp_int8.safetensors"
    infercomp.quantize(SAMPLE["mlp"], out, scheme="int8", measure=False)
    model = infercomp.load(out, compute="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    y = model(torch.rand(3, 1, 8, 8))
    assert y.dtype == torch.float32 and y.shape == (3, 10)
    fp32 = infercomp.load(out, compute="fp32")
    assert next(fp32.parameters()).dtype == torch.float32


SCHEMES = ("int8", "int8-dynamic", "int4", "fp8", "fp16", "bf16")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("schemes")
    out = {}
    for scheme in SCHEMES:
        out[scheme] = d / f"{scheme}.safetensors"
        infercomp.quantize(SAMPLE["transformer"], out[scheme], scheme=scheme, measure=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", compute.MODES)
def test_compute_flag_on_every_scheme(runner, quantized: dict[str, Path], scheme: str, mode: str) -> None:
    r = invoke(
        runner, "report", SAMPLE["transformer"], quantized[scheme], "--data", DIGITS_TEST, "--compute", mode, "--no-latency", "-f", "json"
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["settings"]["compute"] == mode and isinstance(doc["settings"]["cpu_features"], list)
    ran = doc["models"][1]["compute"]["mode"]
    if mode == "auto":
        assert ran in allowed_modes({scheme, "float32"}) or ran.startswith("int8")
    else:
        assert ran.partition("+")[0] == mode
    assert doc["models"][1]["fidelity"]["cosine_mean"] > 0.99


def test_layers_name_each_kernel(runner, quantized: dict[str, Path]) -> None:
    r = invoke(runner, "report", SAMPLE["transformer"], quantized["bf16"], "--compute", "bf16", "--no-latency", "--layers", "-f", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["models"][1]["layers"]
    assert {row["name"]: row["kernel"] for row in rows}["layers.0.fc1.weight"] == "bf16 linear"


@pytest.mark.slow
@pytest.mark.parametrize("cap", ["AVX2", "AVX512_CORE_VNNI"])
def test_auto_under_an_isa_cap_never_picks_a_slower_path(tmp_path: Path, cap: str) -> None:
    """On a CPU without bf16 matrix units (oneDNN capped here), auto offers only what runs
    natively there and leaves fp32 only for a mode it measured faster, on a mid-size layer."""
    script = """
import json, sys, torch
from torch import nn
from infercomp.compute import prepare
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024)).eval()
_, info = prepare(m, "auto", example=torch.randn(256, 1024), allowed=("fp32", "bf16", "int8"))
print(json.dumps({"mode": info.mode, "trial": info.trial_ms}))
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap, "INFERCOMP_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    trial = got["trial"]
    assert "bf16" not in trial and "int8+bf16" not in trial  # no native bf16 under either cap
    if cap == "AVX2":  # int8 accumulates inexactly there: nothing to try, fp32 stays
        assert got["mode"] == "fp32" and trial == {}
    else:
        assert set(trial) <= {"fp32", "int8"}
        if trial:
            assert trial[got["mode"]] <= trial["fp32"]
        if got["mode"] != "fp32":
            assert trial[got["mode"]] < compute.MARGIN * trial["fp32"]


def test_int8_kernel_numerics_against_float() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(384, 1536)
    x = torch.randn(4, 32, 384)
    ref = F.linear(x, lin.weight, lin.bias).detach()
    mod = Int8Linear(Int8Weight.from_float(lin.weight.detach(), lin.bias.detach()))
    for dtype, floor in ((torch.float32, 30), (torch.bfloat16, 25)):
        y = mod(x.to(dtype))
        assert y.dtype == dtype and y.shape == ref.shape
        assert sqnr(ref, y.float()) > floor


def test_weights_in_memory_follow_the_compute_mode() -> None:
    fp32 = infercomp.report([SAMPLE["cnn"]], compute="fp32", latency=False).models[0].weight_memory_bytes
    bf16 = infercomp.report([SAMPLE["cnn"]], compute="bf16", latency=False).models[0].weight_memory_bytes
    assert fp32 == pytest.approx(4 * 159_850, rel=0.02)  # float32 parameters (+ BatchNorm statistics)
    assert bf16 == pytest.approx(fp32 / 2, rel=0.01)


@pytest.mark.slow
def test_compile_flag_runs_and_is_reported(runner) -> None:
    r = invoke(runner, "report", SAMPLE["mlp"], "--data", DIGITS_TEST, "--compile", "--min-time", "0.05", "--warmup", "2", "-f", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["settings"]["compile"] is True and doc["models"][0]["compute"]["compiled"] is True
    assert doc["models"][0]["latency_ms"]["median"] > 0 and doc["models"][0]["accuracy"] > 0.95
