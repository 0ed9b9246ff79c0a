"""quantize/: what each scheme writes (decoded values, error bounds, layout), loading it back to run
quantized, GPTQ against RTN, config validation. (The formats themselves: tests/formats/; the
command: tests/test_cli_quantize.py.)"""

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
import infercomp.formats.grid as grid
import infercomp.formats.qmodules as qmodules
import infercomp.hessian as hessian
from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.data import load_data
from infercomp.errors import UsageError
from infercomp.formats import FORMATS
from infercomp.metrics import sqnr
from infercomp.models import ModelLoader
from infercomp.quantize import QuantizeConfig, quantize
from infercomp.transform import Context
from tests.conftest import DIGITS_TEST, DIGITS_TRAIN, SAMPLE, outlier_columns

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


# ------------------------------------------------------------------------------ what is written


@pytest.mark.parametrize(
    ("scheme", "group_size", "asymmetric"),
    [
        ("int8", None, False),
        ("int8", 32, False),
        ("int8-dynamic", None, False),
        ("int4", 32, False),
        ("int4", 64, True),
        ("int4", -1, False),  # per output channel
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
            q, s = grid.quantize_fp8(w)
            expected = grid.dequantize_fp8(q, s).reshape(w.shape)
        else:
            pick = grid.choose_column_scale if scheme in ("int8", "int4") else grid.quantize_rtn
            qz = pick(w, cfg.format, cfg.groups)
            expected = grid.dequantize(qz.q, qz.scale, qz.zero_point, column_scale=qz.column_scale).reshape(w.shape)
            assert out.encodings[name].get("column_scale", False) == (qz.column_scale is not None)
        assert torch.equal(dense[name], expected), name
        assert sqnr(w, dense[name]) >= MIN_SQNR[scheme], (name, sqnr(w, dense[name]))
        keys = FORMATS[scheme].keys(name, out.encodings[name])
        assert all(k in out.tensors for k in keys)
    if scheme == "int4":  # compressed-tensors naming, packed bytes
        assert out.tensors["fc.weight_packed"].dtype == torch.uint8 and out.tensors["fc.weight_packed"].shape == (48, 64)
        assert ("fc.weight_zero_point" in out.tensors) == asymmetric


def test_no_column_scales_gives_the_plain_layout() -> None:
    ckpt = Checkpoint(tensors={"fc.weight": outlier_columns(7), "fc.bias": torch.zeros(64)})
    on = quantize(ckpt, QuantizeConfig(scheme="int8"), _ctx())
    off = quantize(ckpt, QuantizeConfig(scheme="int8", column_scales=False), _ctx())
    assert on.encodings["fc.weight"]["column_scale"] is True and "fc.weight_column_scale" in on.tensors
    assert "column_scale" not in off.encodings["fc.weight"] and set(off.tensors) == {"fc.weight", "fc.weight_scale", "fc.bias"}
    dense_on, dense_off = (formats.logical_tensors(c.tensors, c.encodings)["fc.weight"] for c in (on, off))
    assert sqnr(ckpt.tensors["fc.weight"], dense_on) > sqnr(ckpt.tensors["fc.weight"], dense_off) + 3


def test_column_scales_need_format_version_2(tmp_path: Path) -> None:
    """A reader that predates column scales would decode w / c without noticing: such files say
    format 2 (which version-1 readers refuse); files without them stay readable as format 1."""
    ckpt = Checkpoint(tensors={"fc.weight": outlier_columns(7), "fc.bias": torch.zeros(64)})
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


@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
def test_casts_every_float_tensor(scheme: str) -> None:
    out = quantize(_weights_ckpt(), QuantizeConfig(scheme=scheme), _ctx())
    assert not out.encodings
    assert {t.dtype for t in out.tensors.values()} == {torch.float16 if scheme == "fp16" else torch.bfloat16}


def test_include_exclude_choose_modules() -> None:
    out = quantize(_weights_ckpt(), QuantizeConfig(scheme="int8", include=("fc", "emb"), exclude=("emb",)), _ctx())
    assert set(out.encodings) == {"fc.weight"}


# ------------------------------------------------------------------------------ loading it back


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 256)
        # fc1 is above qmodules.SMALL_LAYER (runs the stored form), fc2 below it (decoded at load).
        self.fc1, self.fc2 = nn.Linear(256, 512), nn.Linear(512, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.emb(ids))))


def net() -> _Net:
    return _Net()


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int4", "fp8"])
def test_load_back_runs_quantized(scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCOMP_CACHE_DIR", str(tmp_path / "cache"))
    ref = net().eval()
    ckpt = Checkpoint(tensors=dict(ref.state_dict()), model={"ref": "tests.test_quantize:net", "config": {}})
    out = quantize(ckpt, QuantizeConfig(scheme=scheme), _ctx())
    path = tmp_path / "q.safetensors"
    checkpoint.save(out, path)
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y_ref = ref(ids)
    floor = {"int8": 35, "int8-dynamic": 35, "int4": 15, "fp8": 25}[scheme]
    # What a CUDA GPU runs: the stored form (compact weights, fp8 matmuls), here on the CPU.
    stored = ModelLoader(ref="tests.test_quantize:net").build(checkpoint.load(path), runtime=True)
    assert isinstance(stored.emb, qmodules.QuantEmbedding) and isinstance(stored.fc1, qmodules.QuantLinear)
    assert type(stored.fc2) is (qmodules.QuantLinear if scheme == "fp8" else nn.Linear)  # fp8 keeps its GPU matmul path
    dense = infercomp.load(path, model="tests.test_quantize:net", compute="fp32")
    assert type(dense.fc1) is nn.Linear and dense.fc1.weight.dtype == torch.float32
    int8 = infercomp.load(path, model="tests.test_quantize:net", compute="int8", example=ids)
    assert type(int8.fc1).__name__ == "Int8Linear" and type(int8.fc2) is nn.Linear  # fc2 is below SMALL_LAYER
    with torch.inference_mode():
        y_stored, y_dense, y_int8 = stored(ids), dense(ids), int8(ids)
    assert sqnr(y_ref, y_dense) > floor
    # The stored form computes what the decoded weights compute.
    assert F.cosine_similarity(y_stored.flatten(1), y_dense.flatten(1)).min() > 0.99999
    # int8 activations on top of the stored weights, or identical where the layer's trial kept
    # the float path for this small batch (sqnr None: no error at all).
    s = sqnr(y_dense, y_int8)
    assert s is None or s > 20


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


class _SamePadding(nn.Module):
    """A conv with padding="same" (GPTQ's unfolding needs numeric padding) before a Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding="same"), nn.Linear(4 * 8 * 8, 10)
        self.example_input_shape = (1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _same_padding() -> _SamePadding:
    return _SamePadding()


def test_gptq_falls_back_to_rtn_on_string_padding() -> None:

    assert not hessian.supported(nn.Conv2d(2, 4, 3, padding="same"))
    assert hessian.supported(nn.Conv2d(2, 4, 3, padding=1)) and hessian.supported(nn.Linear(4, 4))
    m = _same_padding()
    ckpt = Checkpoint(tensors=dict(m.state_dict()), model={"ref": "tests.test_quantize:_same_padding", "config": {}})
    ctx = Context(loader=ModelLoader(trust_model_code=True), data=load_data(DIGITS_TRAIN), device=torch.device("cpu"))
    out = quantize(ckpt, QuantizeConfig(scheme="int8", method="gptq"), ctx)
    assert {n: s["method"] for n, s in out.encodings.items()} == {"conv.weight": "rtn", "fc.weight": "gptq"}
    rtn = quantize(ckpt, QuantizeConfig(scheme="int8", method="rtn"), ctx)  # the conv gets exactly what RTN writes
    assert {k: v for k, v in out.encodings["conv.weight"].items() if k != "method"} == {
        k: v for k, v in rtn.encodings["conv.weight"].items() if k != "method"
    }
    assert all(torch.equal(out.tensors[k], rtn.tensors[k]) for k in FORMATS["int8"].keys("conv.weight", out.encodings["conv.weight"]))
    dense = formats.logical_tensors(out.tensors, out.encodings)
    assert not torch.equal(dense["fc.weight"], formats.logical_tensors(rtn.tensors, rtn.encodings)["fc.weight"])
