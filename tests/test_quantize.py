"""quantize: storage round trips, error bounds per scheme, runtime modules, GPTQ vs RTN, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import infercomp
import infercomp.formats as formats
import infercomp.formats.grid as schemes
import infercomp.formats.qmodules as runtime
from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.data import load_data
from infercomp.errors import UsageError
from infercomp.formats import FORMATS
from infercomp.formats.grid import IntFormat
from infercomp.measure import sqnr
from infercomp.models import ModelLoader
from infercomp.quantize import SCHEMES, QuantizeConfig, quantize
from infercomp.transform import Context
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, KNOWN_ACCURACY, SAMPLE, invoke, run_cli

NO_LAT = ("--min-time", "0.05", "--warmup", "1")
# Weight SQNR (dB) each scheme must reach on Gaussian weights (theory: int8 ~ 40, int4/g32 ~ 20, fp8 ~ 31).
MIN_SQNR = {"int8": 38.0, "int8-dynamic": 38.0, "int4": 18.0, "fp8": 28.0}


def _ctx(data: Path | None = None) -> Context:
    return Context(loader=ModelLoader(), data=None if data is None else load_data(data), device=torch.device("cpu"))


def _weights_ckpt() -> Checkpoint:
    """A checkpoint of plain tensors: a Linear-like matrix, a conv filter bank, an embedding table."""
    g = torch.Generator().manual_seed(0)
    return Checkpoint(
        tensors={
            "fc.weight": torch.randn(48, 128, generator=g),
            "fc.bias": torch.randn(48, generator=g),
            "conv.weight": torch.randn(16, 16, 2, 2, generator=g),
            "emb.weight": torch.randn(100, 64, generator=g),
            "norm.weight": torch.ones(64),
        }
    )


# ------------------------------------------------------------------------------ storage formats


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_pack_unpack_is_exact(symmetric: bool) -> None:
    fmt = IntFormat(4, symmetric)
    q = torch.randint(fmt.qmin, fmt.qmax + 1, (7, 64), dtype=torch.int8)
    packed = schemes.pack_int4(q, symmetric)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)  # two values per byte
    assert torch.equal(schemes.unpack_int4(packed, symmetric), q)


@pytest.mark.parametrize(
    ("scheme", "group_size", "asymmetric"),
    [
        ("int8", None, False),
        ("int8", 32, False),
        ("int8-dynamic", None, False),
        ("int4", 32, False),
        ("int4", 64, True),
        ("fp8", None, False),
    ],
)
def test_stored_form_decodes_to_the_quantizer_values(scheme: str, group_size: int | None, asymmetric: bool) -> None:
    """What is written decodes to exactly the values the quantizer chose, and has the promised SQNR."""
    ckpt = _weights_ckpt()
    cfg = QuantizeConfig(scheme=scheme, group_size=group_size, asymmetric=asymmetric)
    out = quantize(ckpt, cfg, _ctx())
    assert set(out.encodings) == {"fc.weight", "conv.weight", "emb.weight"}  # embeddings too; norms/biases kept
    assert out.tensors["norm.weight"].dtype == torch.float32 and torch.equal(out.tensors["fc.bias"], ckpt.tensors["fc.bias"])
    dense = formats.logical_tensors(out.tensors, out.encodings)
    for name in out.encodings:
        w = ckpt.tensors[name]
        if scheme == "fp8":
            q, s = schemes.quantize_fp8(w)
            expected = schemes.dequantize_fp8(q, s).reshape(w.shape)
        else:
            pick = schemes.choose_column_scale if scheme in ("int8", "int4") else schemes.quantize_rtn
            qz = pick(w, cfg.format, cfg.groups)
            expected = schemes.dequantize(qz.q, qz.scale, qz.zero_point, column_scale=qz.column_scale).reshape(w.shape)
            assert out.encodings[name].get("column_scale", False) == (qz.column_scale is not None)
        assert torch.equal(dense[name], expected), name
        assert sqnr(w, dense[name]) >= MIN_SQNR[scheme], (name, sqnr(w, dense[name]))
        keys = FORMATS[scheme].keys(name, out.encodings[name])
        assert all(k in out.tensors for k in keys)
    if scheme == "int4":  # compressed-tensors naming, packed bytes
        assert out.tensors["fc.weight_packed"].dtype == torch.uint8 and out.tensors["fc.weight_packed"].shape == (48, 64)
        assert ("fc.weight_zero_point" in out.tensors) == asymmetric


def _outlier_columns(seed: int, rows: int = 64, cols: int = 256) -> torch.Tensor:
    """Gaussian weights with a few input columns 20x larger (as in transformer FFN projections)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:, torch.randperm(cols, generator=g)[:4]] *= 20
    return w


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (8, 128), (4, 32)])
def test_column_scales_cut_error_on_outlier_columns(bits: int, group_size: int | None) -> None:
    w = _outlier_columns(6)
    plain = schemes.quantize_rtn(w, IntFormat(bits), group_size)
    cs = schemes.column_scales(w)
    scaled = schemes.quantize_rtn(w, IntFormat(bits), group_size, cs)
    assert cs.dtype == torch.float8_e4m3fn and cs.shape == (256,) and bool((cs.float() > 0).all())
    err = [sqnr(w, schemes.dequantize(z.q, z.scale, None, column_scale=z.column_scale)) for z in (plain, scaled)]
    assert err[1] > err[0] + 3, err
    assert schemes.choose_column_scale(w, IntFormat(bits), group_size).column_scale is not None


def test_column_scales_are_left_out_where_they_do_not_help() -> None:
    w = torch.ones(8, 64)  # every column alike: nothing to equalize, plain RTN is exact
    assert schemes.choose_column_scale(w, IntFormat(8), None).column_scale is None


def test_no_column_scales_gives_the_plain_layout() -> None:
    ckpt = Checkpoint(tensors={"fc.weight": _outlier_columns(7), "fc.bias": torch.zeros(64)})
    on = quantize(ckpt, QuantizeConfig(scheme="int8"), _ctx())
    off = quantize(ckpt, QuantizeConfig(scheme="int8", column_scales=False), _ctx())
    assert on.encodings["fc.weight"]["column_scale"] is True and "fc.weight_column_scale" in on.tensors
    assert "column_scale" not in off.encodings["fc.weight"] and set(off.tensors) == {"fc.weight", "fc.weight_scale", "fc.bias"}
    dense_on, dense_off = (formats.logical_tensors(c.tensors, c.encodings)["fc.weight"] for c in (on, off))
    assert sqnr(ckpt.tensors["fc.weight"], dense_on) > sqnr(ckpt.tensors["fc.weight"], dense_off) + 3


def test_column_scales_need_format_version_2(tmp_path: Path) -> None:
    """A reader that predates column scales would decode w / c without noticing: such files say
    format 2 (which version-1 readers refuse); files without them stay readable as format 1."""
    ckpt = Checkpoint(tensors={"fc.weight": _outlier_columns(7), "fc.bias": torch.zeros(64)})
    for flag, version in ((None, 2), (False, 1)):
        path = checkpoint.save(
            quantize(ckpt, QuantizeConfig(scheme="int8", column_scales=flag), _ctx()), tmp_path / f"{version}.safetensors"
        )
        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["infercomp"])["format_version"] == version
        assert checkpoint.load(path).encodings["fc.weight"].get("column_scale", False) == (version == 2)


@pytest.mark.parametrize(("scheme", "method"), [("int8-dynamic", "rtn"), ("fp8", "rtn"), ("int8", "gptq")])
def test_column_scales_only_with_weight_only_rtn(scheme: str, method: str) -> None:
    with pytest.raises(UsageError, match="--column-scales applies to"):
        QuantizeConfig(scheme=scheme, method=method, column_scales=True)


def test_quantized_embedding_with_column_scales_gathers_decoded_rows() -> None:
    w = _outlier_columns(8, rows=40, cols=32)
    cs = schemes.column_scales(w)
    qz = schemes.quantize_rtn(w, IntFormat(8), None, cs)
    emb = runtime.QuantEmbedding(runtime.StoredWeight("int8", [40, 32], qz.q, qz.scale, None, True, cs), nn.Embedding(40, 32))
    idx = torch.tensor([[3, 0, 39], [7, 7, 1]])
    decoded = schemes.dequantize(qz.q, qz.scale, None, column_scale=cs)
    assert torch.equal(emb(idx), decoded[idx])


def test_int8_group_scales_beat_per_channel() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g) * torch.logspace(-2, 0, 256)  # columns of very different size
    per_channel = schemes.quantize_rtn(w, IntFormat(8), None)
    grouped = schemes.quantize_rtn(w, IntFormat(8), 32)
    err = [sqnr(w, schemes.dequantize(z.q, z.scale, None)) for z in (per_channel, grouped)]
    assert grouped.scale.shape == (32, 8) and err[1] > err[0] + 3


def test_tiny_scales_are_stored_in_float32() -> None:
    w = torch.randn(4, 32) * 1e-6  # scales below float16's normal range
    z = schemes.quantize_rtn(w, IntFormat(8), None)
    assert z.scale.dtype == torch.float32 and sqnr(w, schemes.dequantize(z.q, z.scale, None)) > 38


@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
def test_casts_every_float_tensor(scheme: str) -> None:
    out = quantize(_weights_ckpt(), QuantizeConfig(scheme=scheme), _ctx())
    assert not out.encodings
    assert {t.dtype for t in out.tensors.values()} == {torch.float16 if scheme == "fp16" else torch.bfloat16}


def test_include_exclude_choose_modules() -> None:
    out = quantize(_weights_ckpt(), QuantizeConfig(scheme="int8", include=("fc", "emb"), exclude=("emb",)), _ctx())
    assert set(out.encodings) == {"fc.weight"}


# ------------------------------------------------------------------------------ runtime modules


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 256)
        # fc1 is above runtime.SMALL_LAYER (runs the stored form), fc2 below it (decoded at load).
        self.fc1, self.fc2 = nn.Linear(256, 512), nn.Linear(512, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.emb(ids))))


def net() -> _Net:
    return _Net()


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int4", "fp8"])
def test_load_back_runs_quantized(scheme: str, tmp_path: Path) -> None:
    ref = net().eval()
    ckpt = Checkpoint(tensors=dict(ref.state_dict()), model={"ref": "tests.test_quantize:net", "config": {}})
    out = quantize(ckpt, QuantizeConfig(scheme=scheme), _ctx())
    path = tmp_path / "q.safetensors"
    checkpoint.save(out, path)
    m = infercomp.load(path, model="tests.test_quantize:net")
    assert isinstance(m.emb, runtime.QuantEmbedding)
    assert isinstance(m.fc1, runtime.DynamicInt8Linear if scheme == "int8-dynamic" else runtime.QuantLinear)
    assert type(m.fc2) is (runtime.QuantLinear if scheme == "fp8" else nn.Linear)  # fp8 keeps its GPU matmul path
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y, y_ref = m(ids), ref(ids)
        single = m(ids[:1, :1])  # one row: the weight-only int8 kernel path
    # The runtime module computes what the decoded weights compute.
    dense = ModelLoader(ref="tests.test_quantize:net").build(checkpoint.load(path), runtime=False)
    with torch.inference_mode():
        y_dense = dense(ids)
    floor = {"int8": 35, "int8-dynamic": 30, "int4": 15, "fp8": 25}[scheme]
    assert sqnr(y_ref, y) > floor
    assert F.cosine_similarity(y.flatten(1), y_dense.flatten(1)).min() > (0.999 if scheme == "int8-dynamic" else 0.99999)
    assert torch.allclose(single, y[:1, :1], rtol=1e-3, atol=1e-3 if scheme != "int8-dynamic" else 5e-2)


@pytest.mark.parametrize(
    ("kind", "group_size", "columns"),
    [("int8", None, False), ("int8", None, True), ("int8", 32, False), ("int4", 32, True), ("fp8", None, False)],
)
@pytest.mark.parametrize("rows", [1, 8])
def test_large_linear_runs_what_was_stored(kind: str, group_size: int | None, columns: bool, rows: int) -> None:
    """Layers above runtime.SMALL_LAYER keep only the stored form: kernel (1 row) or per-call dequantization."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(512, 256, generator=g) * 0.05, torch.randn(512, generator=g)
    if kind == "fp8":
        q, s = schemes.quantize_fp8(w)
        stored, z = runtime.StoredWeight("fp8", [512, 256], q, s, None, True), None
    else:
        cs = schemes.column_scales(w) if columns else None
        qz = schemes.quantize_rtn(w, IntFormat(8 if kind == "int8" else 4), group_size, cs)
        data = qz.q if kind == "int8" else schemes.pack_int4(qz.q, True)
        stored, z = runtime.StoredWeight(kind, [512, 256], data, qz.scale, None, True, cs), qz
    mod = runtime.QuantLinear(stored, b)
    x = torch.randn(rows, 256, generator=g)
    decoded = schemes.dequantize_fp8(q, s) if z is None else schemes.dequantize(z.q, z.scale, None, column_scale=z.column_scale)
    with torch.inference_mode():
        assert torch.allclose(mod(x), F.linear(x, decoded, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("skewed", "columns"), [(False, False), (True, False), (True, True)])
def test_large_dynamic_int8_linear_matches_decoded(skewed: bool, columns: bool) -> None:
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(384, 384, generator=g) * 0.05, torch.randn(384, generator=g)
    cs = schemes.column_scales(w) if columns else None  # not written by int8-dynamic, but must run if present
    qz = schemes.quantize_rtn(w, IntFormat(8), None, cs)
    mod = runtime.DynamicInt8Linear(runtime.StoredWeight("int8", [384, 384], qz.q, qz.scale, None, True, cs), b)
    x = torch.randn(2, 64, 384, generator=g)
    if skewed:  # GELU-like rows: centred before rounding
        x = F.gelu(x * 3)
    with torch.inference_mode():
        y, ref = mod(x), F.linear(x, schemes.dequantize(qz.q, qz.scale, None, column_scale=cs), b)
    assert y.shape == (2, 64, 384) and sqnr(ref, y) > 35


@pytest.mark.parametrize("magic", [True, False])
@pytest.mark.parametrize("skewed", [False, True])
def test_activation_rows_round_to_nearest(monkeypatch, magic: bool, skewed: bool) -> None:
    """The rounding trick (and its fallback) gives round-to-nearest of each row on its grid."""
    monkeypatch.setattr(runtime, "_MAGIC_ROUND", magic and runtime._MAGIC_ROUND)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 384, generator=g) * torch.logspace(-3, 2, 64).unsqueeze(1)
    if skewed:
        x = F.gelu(x)
        x[0], x[1] = 5.0, 1000 + torch.rand(384, generator=g) * 1e-3  # constant; tiny range far from 0
    xq, step, centre = runtime._quantize_rows(x)
    assert (centre is not None) == skewed
    exact = x.double() / step.double() - (0 if centre is None else centre.double())
    assert xq.abs().max() <= 127
    near = (xq.double() - exact).abs() <= 0.5 + 1e-3  # nearest grid point (float slack at ties)
    assert near[2:].all() and near[0].all()  # row 1 sits at 2**20 steps, where float32 holds 1/8 step
    decoded = step * (xq.float() + (0 if centre is None else centre))
    assert ((decoded - x).abs() <= 0.5 * step * (1 + 1e-3) + 1e-6 * x.abs()).all()


def test_int8_dynamic_beats_per_tensor_7bit_activations() -> None:
    """Per-token 8-bit activations vs torch.ao's default (per-tensor, reduce_range) on rows with an outlier token."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 256)
    x = torch.randn(64, 256, generator=g)
    x[0] *= 50  # one outlier token (a [CLS]-like row)
    qz = schemes.quantize_rtn(lin.weight.detach(), IntFormat(8), None)
    mod = runtime.DynamicInt8Linear(runtime.StoredWeight("int8", [256, 256], qz.q, qz.scale, None, True), lin.bias.detach())
    with torch.inference_mode():
        ours = mod(x)
        ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)(x)
        ref = lin(x)
    assert sqnr(ref[1:], ours[1:]) > sqnr(ref[1:], ao[1:]) + 10


# ---------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize(("name", "scheme"), [("mlp", "int4"), ("cnn", "int4"), ("mlp", "int8")])
def test_gptq_has_lower_output_error_than_rtn(name: str, scheme: str) -> None:
    ckpt = checkpoint.load(SAMPLE[name])
    loader = ModelLoader()
    ctx = Context(loader=loader, data=load_data(DIGITS_TRAIN), device=torch.device("cpu"))
    test = load_data(DIGITS_TEST).inputs
    with torch.inference_mode():
        ref = loader.build(ckpt)(test)
    errors = {}
    for method in ("rtn", "gptq"):
        q = quantize(ckpt, QuantizeConfig(scheme=scheme, method=method, calib_samples=256), ctx)
        q.model = ckpt.model
        with torch.inference_mode():
            errors[method] = F.mse_loss(loader.build(q)(test), ref).item()
        assert {s["method"] for s in q.encodings.values()} >= {method}
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_needs_data() -> None:
    with pytest.raises(UsageError, match="--data"):
        quantize(checkpoint.load(SAMPLE["mlp"]), QuantizeConfig(scheme="int4", method="gptq"), _ctx())


# ---------------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "int3"}, "--scheme 'int3' is not supported"),
        ({"scheme": "int4", "group_size": 7}, "--group-size 7 is not supported"),
        ({"scheme": "int8-dynamic", "group_size": 32}, "--group-size applies to"),
        ({"scheme": "int8", "asymmetric": True}, "--asymmetric applies to --scheme int4"),
        ({"scheme": "fp8", "method": "gptq"}, "--method gptq applies to"),
        ({"calib_samples": 0}, "--calib-samples"),
        ({"column_scales": 0}, "column_scales must be true, false or unset"),
    ],
)
def test_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        QuantizeConfig(**kwargs)


def test_int4_rows_not_divisible_by_group() -> None:
    ckpt = Checkpoint(tensors={"a.weight": torch.randn(8, 48), "b.weight": torch.randn(8, 64)})
    with pytest.raises(UsageError, match=r"'a.weight' has rows of 48 values, not divisible by --group-size 32.*--exclude a"):
        quantize(ckpt, QuantizeConfig(scheme="int4", include=("a", "b")), _ctx())
    # Without --include, the tensor that does not fit is left in float (and the user is told).
    out = quantize(ckpt, QuantizeConfig(scheme="int4"), _ctx())
    assert set(out.encodings) == {"b.weight"} and out.tensors["a.weight"].dtype == torch.float32


# ------------------------------------------------------------------------------------------ CLI


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("infercomp: error:"), result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--group-size", "7"), ("--group-size 7", "32, 64, 128")),
        (("--scheme", "int5"), ("--scheme 'int5'", "int8-dynamic")),
        (("--scheme", "int8-dynamic", "--column-scales"), ("--column-scales applies to", "--method rtn")),
        (("--scheme", "int4", "--group-size", "128", "--include", "net.1"), ("'net.1.weight' has rows of 64", "--group-size 128")),
    ],
)
def test_cli_bad_options_exit_2(runner, tmp_path: Path, args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    out = tmp_path / "o.safetensors"
    _one_line_error(invoke(runner, "quantize", SAMPLE["mlp"], "-o", out, "--no-latency", *args), *needles)
    assert not out.exists()


def test_cli_int8_on_sample_cnn(runner, tmp_path: Path) -> None:
    out = tmp_path / "cnn_int8.safetensors"
    r = invoke(runner, "quantize", SAMPLE["cnn"], "-o", out, "--data", DIGITS_TEST, "--layers", "--format", "json", *NO_LAT)
    assert r.exit_code == 0, r.stderr
    base, q = json.loads(r.stdout)["models"]
    assert q["ratios"]["size"] <= 0.27 and q["bits_per_weight"] < 9
    assert q["accuracy_drop"] <= 0.003 and q["fidelity"]["cosine_mean"] > 0.999
    assert q["latency_ms"]["median"] > 0
    sq = [row["sqnr_db"] for row in q["layers"] if row["stored"] == "int8"]
    assert len(sq) == 5 and min(sq) > 35  # 3 convs + 2 Linear, every one quantized
    assert base["accuracy"] == pytest.approx(KNOWN_ACCURACY["cnn"], abs=1e-3)


def test_cli_int4_gptq_on_sample_mlp(runner, tmp_path: Path) -> None:
    out = tmp_path / "mlp_int4.safetensors"
    r = invoke(
        runner, "quantize", SAMPLE["mlp"], "-o", out, "--scheme", "int4", "--method", "gptq", "--data", DIGITS_TRAIN,
        "--eval-data", DIGITS_TEST, "--format", "json", "--no-latency",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    q = json.loads(r.stdout)["models"][1]
    assert q["ratios"]["size"] <= 0.16 and q["accuracy_drop"] <= 0.01
    ck = checkpoint.load(out)
    assert ck.history[-1]["config"]["method"] == "gptq" and ck.encodings["net.1.weight"]["group_size"] == 32


def test_cli_subprocess_int8_dynamic(tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    r = run_cli(
        "quantize", SAMPLE["transformer"], "-o", out, "--scheme", "int8-dynamic", "--data", DIGITS_TEST, "--format", "json", *NO_LAT
    )
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)["models"][1]
    assert q["accuracy_drop"] <= 0.01 and q["fidelity"]["cosine_mean"] > 0.99
    m = infercomp.load(out)
    # Layers this small run as plain float Linear layers holding the decoded int8 weights.
    ck = checkpoint.load(out)
    assert ck.encodings["layers.0.fc1.weight"]["codec"] == "int8-dynamic" and type(m.layers[0].fc1) is nn.Linear
    decoded = formats.logical_tensors(ck.tensors, ck.encodings)["layers.0.fc1.weight"]
    assert torch.equal(m.layers[0].fc1.weight, decoded)


def test_every_scheme_is_listed_in_help(runner) -> None:
    r = invoke(runner, "quantize", "--help")
    assert r.exit_code == 0
    for s in SCHEMES:
        assert s in r.stdout


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_on_cuda_matches_dequantized() -> None:
    """On GPUs with fp8 support the Linear runs torch._scaled_mm; elsewhere it dequantizes. Both
    must agree with the float result of the decoded weights."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 128, generator=g) * 0.05, torch.randn(64, generator=g)
    q, s = schemes.quantize_fp8(w)
    mod = runtime.QuantLinear(runtime.StoredWeight("fp8", [64, 128], q, s, None, True), b).cuda()
    x = torch.randn(40, 128, generator=g).cuda()
    with torch.inference_mode():
        y = mod(x)
        ref = F.linear(x, schemes.dequantize_fp8(q, s).cuda(), b.cuda())
    assert y.shape == (40, 64) and y.dtype == torch.float32
    assert sqnr(ref.float().cpu(), y.float().cpu()) > (20 if runtime.fp8_matmul_supported(x.device) else 60)


# ------------------------------------------------------------------- edge cases found in review


def test_dynamic_int8_runs_outside_inference_mode_after_inside() -> None:
    """Scratch buffers first made under inference_mode must stay writable under no_grad."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(384, 384, generator=g) * 0.05
    qz = schemes.quantize_rtn(w, IntFormat(8), None)
    mod = runtime.DynamicInt8Linear(runtime.StoredWeight("int8", [384, 384], qz.q, qz.scale, None, True), None)
    x = torch.randn(8, 384, generator=g)
    with torch.inference_mode():
        a = mod(x)
    with torch.no_grad():
        b = mod(x)
    torch.testing.assert_close(a, b)


def test_gptq_falls_back_to_rtn_on_string_padding() -> None:
    from infercomp.quantize import gptq

    assert not gptq.supported(nn.Conv2d(2, 4, 3, padding="same"))
    assert gptq.supported(nn.Conv2d(2, 4, 3, padding=1)) and gptq.supported(nn.Linear(4, 4))


def test_quantized_embedding_keeps_the_model_dtype() -> None:
    emb = nn.Embedding(32, 16).bfloat16()
    qz = schemes.quantize_rtn(emb.weight.detach().float(), IntFormat(8), None)
    q = runtime.QuantEmbedding(runtime.StoredWeight("int8", [32, 16], qz.q, qz.scale, None, True), emb)
    out = q(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 16)
    nn.LayerNorm(16).bfloat16()(out)  # the next layer accepts it


def test_half_precision_cast_keeps_sparse_storage(runner, tmp_path: Path) -> None:
    pruned, half = tmp_path / "p.safetensors", tmp_path / "p16.safetensors"
    assert invoke(runner, "prune", SAMPLE["mlp"], "-o", pruned, "--sparsity", "0.9", "--no-latency").exit_code == 0
    assert invoke(runner, "quantize", pruned, "-o", half, "--scheme", "fp16", "--no-latency").exit_code == 0
    ck = checkpoint.load(half)
    assert ck.encodings and all(e["codec"] == "sparse-bitmask" for e in ck.encodings.values())
    assert half.stat().st_size < 0.75 * pruned.stat().st_size  # half the bytes per value, same bitmasks
    assert half.stat().st_size < 0.5 * 2 * SAMPLE["mlp"].stat().st_size / 4  # far below a dense fp16 file
    before = formats.logical_tensors(checkpoint.load(pruned).tensors, checkpoint.load(pruned).encodings)
    after = formats.logical_tensors(ck.tensors, ck.encodings)
    for name, w in before.items():
        assert torch.equal(after[name] == 0, w == 0) or not w.is_floating_point(), name
