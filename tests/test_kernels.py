"""infercomp.kernels: int8 kernel numerics by SQNR, the chooser and its cache (no timing thresholds;
the ISA test compares measured medians)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import infercomp.kernels as K

INT8 = {
    "onednn": K.linear_int8_onednn,
    "onednn_bf16math": lambda x, w: K.linear_int8_onednn(x, w, bf16_math=True),
    "intmm": K.linear_int8_intmm,
    "intmm_padded": lambda x, w: K.linear_int8_intmm(x, w, min_m=17),
}


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum())).item()


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("kernel", sorted(INT8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_int8_kernel_sqnr(kernel, dtype, bias, M):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 64, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
    w = torch.randn(48, 64, generator=g) * 0.05
    b = torch.randn(48, generator=g) if bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    y = INT8[kernel](x.to(dtype), K.Int8Weight.from_float(w, b))
    assert y.dtype == dtype and y.shape == (M, 48)
    # int8 x int8 with per-row scales: ~40 dB on Gaussian data; bf16 output costs a little
    assert sqnr_db(ref, y) > 30


def test_batched_input_and_module():
    lin = torch.nn.Linear(32, 24)
    mod = K.Int8Linear.from_linear(lin, kernel="int8_onednn")
    x = torch.randn(2, 7, 32)
    y = mod(x)
    assert y.shape == (2, 7, 24)
    assert sqnr_db(lin(x).detach(), y) > 30


def _per_tensor(x: torch.Tensor, w: K.Int8Weight) -> torch.Tensor:
    """What one activation scale for the whole tensor gives (torch.ao's dynamic default)."""
    s = float(x.abs().amax()) / 127.0
    return F.linear(torch.round(x / s).clamp(-127, 127) * s, w.dequantized())


def test_per_row_beats_per_tensor_on_outlier_rows():
    x = torch.randn(64, 128)
    x[0] *= 100  # one outlier token ruins a per-tensor scale for all other rows
    w = K.Int8Weight.from_float(torch.randn(32, 128) * 0.05)
    ref = F.linear(x, w.dequantized())
    assert sqnr_db(ref[1:], K.linear_int8_onednn(x, w)[1:]) > sqnr_db(ref[1:], _per_tensor(x, w)[1:]) + 10


@pytest.mark.parametrize("seed", range(5))
def test_quantize_rows_roundtrip_and_no_wrap(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 100, generator=g) * 3
    for buf in (torch.empty(8, 100), torch.empty(8, 100, dtype=torch.bfloat16)):
        xin = x.to(buf.dtype)
        # fp32 math: error <= half a step; bf16 math adds up to half a step of product rounding
        tol = 0.5001 if buf.dtype == torch.float32 else 1.0001
        q, s = K.quantize_rows(xin, buf)
        assert q.dtype == torch.int8 and s.shape == (8, 1)
        assert int(q.abs().max()) == 127  # the row max maps to +-127, never wraps to -128
        assert bool(((q.float() * s - xin.float()).abs() <= tol * s).all())
        u, s2 = K.quantize_rows(xin, buf, unsigned=True)
        assert u.dtype == torch.uint8 and torch.equal(s, s2)
        assert int(u.min()) >= 1 and int(u.max()) <= 255
        # same int8 grid as the signed path, up to a +-1 tie/bf16 rounding difference
        assert int(((u.int() - 128) - q.int()).abs().max()) <= 1
        assert bool((((u.float() - 128) * s - xin.float()).abs() <= tol * s).all())


# ----------------------------------------------------------------------------- chooser
def _cands(calls: list[str]) -> dict:
    return {n: (lambda n=n: calls.append(n)) for n in ("fp32", "bf16", "int8_onednn")}


def test_fake_timing_table_picks_fastest(tmp_path):
    cache = K.KernelCache(tmp_path / "k.json")
    table = {"fp32": 3.0, "bf16": 1.0, "int8_onednn": 2.0}
    assert K.choose(_cands([]), ("a",), cache, timings=lambda c: table) == "bf16"
    table2 = {"fp32": 1.0, "bf16": 1.5, "int8_onednn": 1.0}  # ties keep the baseline
    assert K.choose(_cands([]), ("b",), cache, timings=lambda c: table2) == "fp32"


def test_baseline_required():
    with pytest.raises(ValueError):
        K.choose({"bf16": lambda: None}, ("k",), None, timings=lambda c: {"bf16": 1.0})


def test_cache_reused_without_timing(tmp_path):
    path = tmp_path / "k.json"
    n = {"timed": 0}

    def timer(c):
        n["timed"] += 1
        return {"fp32": 2.0, "bf16": 1.0, "int8_onednn": 3.0}

    assert K.choose(_cands([]), ("lin", 4096, 384), K.KernelCache(path), timings=timer) == "bf16"
    # a fresh KernelCache object reads the file: no second timing
    assert K.choose(_cands([]), ("lin", 4096, 384), K.KernelCache(path), timings=timer) == "bf16"
    assert n["timed"] == 1
    data = json.loads(path.read_text())
    (key,) = data
    ctx = K.KernelCache.context()
    assert key.startswith(ctx) and K.cpu_model() in key and torch.__version__ in key
    assert data[key]["choice"] == "bf16"
    # a different key tuple is timed again
    K.choose(_cands([]), ("lin", 16, 384), K.KernelCache(path), timings=timer)
    assert n["timed"] == 2


def test_cache_key_includes_isa_limit(tmp_path, monkeypatch):
    path = tmp_path / "k.json"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    K.choose(_cands([]), ("x",), K.KernelCache(path), timings=lambda c: {"fp32": 1, "bf16": 0.5})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert K.isa_limit() == "AVX2"
    got = K.choose(_cands([]), ("x",), K.KernelCache(path), timings=lambda c: {"fp32": 1, "bf16": 2})
    assert got == "fp32" and len(json.loads(path.read_text())) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": 5}', ""])
def test_corrupt_cache_ignored_and_rewritten(tmp_path, content):
    path = tmp_path / "k.json"
    path.write_text(content)
    got = K.choose(_cands([]), ("c",), K.KernelCache(path), timings=lambda c: {"fp32": 1, "bf16": 0.1})
    assert got == "bf16"
    assert isinstance(json.loads(path.read_text()), dict)  # rewritten as valid JSON
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temp file replaced


def test_unwritable_cache_dir_does_not_crash(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        cache = K.KernelCache(ro / "sub" / "k.json")
        got = K.choose(_cands([]), ("u",), cache, timings=lambda c: {"fp32": 1, "bf16": 0.1})
        assert got == "bf16"
        assert cache.put(("u",), {"choice": "fp32"}) is (os.geteuid() == 0)  # root ignores modes
    finally:
        ro.chmod(stat.S_IRWXU)
    # a path whose parent is a *file* fails even for root
    f = tmp_path / "file"
    f.write_text("x")
    cache = K.KernelCache(f / "k.json")
    assert K.choose(_cands([]), ("v",), cache, timings=lambda c: {"fp32": 1, "bf16": 0.1}) == "bf16"
    assert cache.put(("v",), {"choice": "fp32"}) is False


def test_default_cache_path_env(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERCOMP_CACHE_DIR", str(tmp_path))
    assert K.KernelCache().path == tmp_path / "kernels.json"


def test_real_measure_calls_every_candidate(tmp_path):
    calls: list[str] = []
    got = K.choose(_cands(calls), ("r",), K.KernelCache(tmp_path / "k.json"), budget_s=0.001)
    assert got in ("fp32", "bf16", "int8_onednn")
    assert {c: calls.count(c) for c in set(calls)} == {c: calls.count("fp32") for c in ("fp32", "bf16", "int8_onednn")}
    assert calls.count("fp32") >= 4  # warm-up + min_rounds


def test_measure_drops_pathologically_slow_candidate():
    import time as _t

    calls: list[str] = []
    cands = {"fp32": lambda: calls.append("fp32"), "slow": lambda: (calls.append("slow"), _t.sleep(0.05))}
    res = K.measure(cands, budget_s=0.0, min_rounds=3, baseline="fp32")
    assert calls.count("slow") == 2 and calls.count("fp32") == 4  # warm-up + 1 round vs 3
    assert res["slow"] > res["fp32"]


def test_module_uses_cache(tmp_path):
    cache = K.KernelCache(tmp_path / "k.json")
    mod = K.Int8Linear.from_linear(torch.nn.Linear(64, 32), cache=cache)
    x = torch.randn(20, 64)
    y = mod(x)
    assert y.shape == (20, 32)
    entry = cache.get(("int8_linear", 32, 64, 32, "torch.float32"))
    assert entry is not None and entry["choice"] in ("fp32", *K.INT8_KERNELS)
    expect = {"fp32", *K.INT8_KERNELS} if K.int8_exact_ok() else {"fp32"}
    assert set(entry["timings_ms"]) == expect


def test_onednn_bf16_ok_respects_isa_limit(monkeypatch):
    monkeypatch.setattr(K, "cpu_features", lambda: ["avx2", "avx512_bf16", "avx512f"])
    for cap, ok in [
        (None, True),
        ("AVX2", False),
        ("AVX512_CORE_VNNI", False),
        ("AVX512_CORE_BF16", True),
        ("AVX512_CORE_AMX", True),
        ("weird", False),
    ]:
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert K.onednn_bf16_ok() is ok, cap
    monkeypatch.setattr(K, "cpu_features", lambda: ["avx2"])
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert not K.onednn_bf16_ok()


def test_onednn_bf16_input_without_native_bf16(monkeypatch):
    monkeypatch.setattr(K, "onednn_bf16_ok", lambda: False)  # forces the fp32-out + cast path
    x = torch.randn(20, 64)
    w = torch.randn(32, 64) * 0.05
    b = torch.randn(32)
    y = K.linear_int8_onednn(x.bfloat16(), K.Int8Weight.from_float(w, b))
    assert y.dtype == torch.bfloat16 and sqnr_db(F.linear(x, w, b), y) > 30


def test_int8_not_offered_without_vnni(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not K.int8_exact_ok()
    seen = {}

    def timer(c):
        seen.update(c)
        return {k: 1.0 for k in c}

    monkeypatch.setattr(K, "measure", lambda c, *a, **kw: timer(c))
    mod = K.Int8Linear.from_linear(torch.nn.Linear(16, 8), K.KernelCache(tmp_path / "k.json"))
    mod(torch.randn(3, 16))
    assert set(seen) == {"fp32"}


def test_cpu_description():
    feats = K.cpu_features()
    assert feats == sorted(feats) and set(feats) <= set(K._ISA_FLAGS)
    assert isinstance(K.cpu_model(), str) and K.cpu_model()


# ----------------------------------------------------------------------------- ISA-limited run
_ISA_CHILD = textwrap.dedent("""
    import json, sys, torch, torch.nn.functional as F
    import infercomp.kernels as K
    torch.set_num_threads(2)
    torch.manual_seed(0)
    M = Kd = N = 1024
    x = torch.randn(M, Kd); w = torch.randn(N, Kd) * 0.02
    W = K.Int8Weight.from_float(w)
    xb, wb = x.bfloat16(), w.bfloat16()
    cands = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb),
             "int8_onednn": lambda: K.linear_int8_onednn(x, W),
             "int8_onednn_bf16in": lambda: K.linear_int8_onednn(xb, W),
             "int8_intmm": lambda: K.linear_int8_intmm(x, W)}
    cache = K.KernelCache(sys.argv[2])
    pick = K.choose(cands, ("isa_test", M, Kd, N), cache, budget_s=0.1)
    print(json.dumps({"pick": pick, "entry": cache.get(("isa_test", M, Kd, N)),
                      "isa": K.isa_limit()}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["AVX2", None])
def test_chooser_never_slower_than_fp32_under_isa_limit(tmp_path, isa):
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa  # must be set before torch loads oneDNN
    out = subprocess.run(
        [sys.executable, "-c", _ISA_CHILD, "-", str(tmp_path / "k.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["isa"] == isa
    t = res["entry"]["timings_ms"]
    assert set(t) == {"fp32", "bf16", "int8_onednn", "int8_onednn_bf16in", "int8_intmm"}
    # the pick is the measured minimum and never slower than fp32's measured median
    assert t[res["pick"]] <= t["fp32"]
    assert t[res["pick"]] == min(t.values()) or res["pick"] == "fp32"


def test_skewed_rows_use_their_full_range():
    """GELU-like rows (mostly positive) get a zero point per row: far more precise than a
    symmetric per-row scale, which leaves half of their levels unused."""
    g = torch.Generator().manual_seed(0)
    x = F.gelu(torch.randn(64, 256, generator=g) * 2) + 0.5  # every row: midpoint well above zero
    w = K.Int8Weight.from_float(torch.randn(96, 256, generator=g) * 0.05, torch.randn(96, generator=g))
    ref = F.linear(x.double(), w.dequantized().double(), w.bias.double())
    assert K._skewed_rows(x) is not None
    skewed = K.linear_int8_onednn(x, w)
    qx, s = K.quantize_rows(x)  # the symmetric per-row form, for comparison
    symmetric = F.linear(qx.float() * s, w.dequantized(), w.bias)
    assert sqnr_db(ref, skewed) > sqnr_db(ref, symmetric) + 4
    assert K._skewed_rows(torch.randn(8, 32)) is None  # centred rows keep the fused symmetric path


def test_per_token_int8_beats_torch_ao_per_tensor_7bit_activations():
    """Per-token 8-bit activations vs torch.ao's default (per-tensor, reduce_range) on rows with an outlier token."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(64, 256, generator=g)
    x[0] *= 50  # one outlier token (a [CLS]-like row)
    mod = K.Int8Linear.from_linear(lin, kernel="int8_onednn")
    with torch.inference_mode():
        ours = mod(x)
        ao = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)(x)
        ref = lin(x)
    assert sqnr_db(ref[1:], ours[1:]) > sqnr_db(ref[1:], ao[1:]) + 10


def test_runs_under_no_grad_after_inference_mode():
    """Scratch buffers first made under inference_mode must stay writable under no_grad."""
    mod = K.Int8Linear.from_linear(torch.nn.Linear(384, 384), kernel="int8_onednn")
    x = torch.randn(8, 384)
    with torch.inference_mode():
        a = mod(x)
    with torch.no_grad():
        b = mod(x)
    torch.testing.assert_close(a, b)
