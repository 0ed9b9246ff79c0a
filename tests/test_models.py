"""Model references, trust rules, and shape-adaptive building."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from infercomp import checkpoint, zoo
from infercomp.checkpoint import Checkpoint
from infercomp.errors import ModelError, UsageError
from infercomp.models import ModelLoader, adapt_shapes, parse_config, resolve
from tests.conftest import SAMPLE, tiny_mlp

USER_MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, width=5):
        super().__init__()
        self.lin = nn.Linear(3, width)

    def forward(self, x):
        return self.lin(x)
"""


def test_builtin_reference_is_trusted() -> None:
    ck = checkpoint.load(SAMPLE["mlp"])
    m = ModelLoader().build(ck)
    assert isinstance(m, zoo.DigitsMLP) and not m.training


def test_stored_reference_not_trusted_without_flag(tiny_ckpt: Path) -> None:
    ck = checkpoint.load(tiny_ckpt)
    with pytest.raises(ModelError, match=r"not trusted; pass --model tests.conftest:tiny_mlp .* or --trust-model-code"):
        ModelLoader().build(ck)
    assert isinstance(ModelLoader(trust_model_code=True).build(ck), nn.Module)
    assert isinstance(ModelLoader(ref="tests.conftest:tiny_mlp").build(ck), nn.Module)


def test_file_reference_and_config(tmp_path: Path) -> None:
    src = tmp_path / "user_model.py"
    src.write_text(USER_MODEL)
    ref = f"{src}:Net"
    net = resolve(ref)(width=7)
    ck = Checkpoint(tensors=dict(net.state_dict()), model={"ref": ref, "config": {"width": 7}})
    built = ModelLoader(ref=ref, config={"width": 7}).build(ck)
    assert built.lin.out_features == 7
    assert torch.equal(built.lin.weight, net.lin.weight)
    # The stored config is reused when the user names the same reference without a config.
    assert ModelLoader(ref=ref).build(ck).lin.out_features == 7


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no-such-model", "unknown model reference"),
        ("no_such_pkg.mod:f", "cannot import module"),
        ("infercomp.zoo:Missing", "has no callable 'Missing'"),
        ("/nonexistent/file.py:Net", "does not exist"),
    ],
)
def test_bad_references(ref: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        resolve(ref)


def test_file_reference_import_error_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(ModelError, match="boom at import"):
        resolve(f"{bad}:Net")


def test_parse_config_json_and_file(tmp_path: Path) -> None:
    assert parse_config('{"hidden": [8]}') == {"hidden": [8]}
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"a": 1}))
    assert parse_config(str(f)) == {"a": 1}
    assert parse_config(None) is None
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_config("{oops")
    with pytest.raises(UsageError, match="JSON object"):
        parse_config("[1, 2]")


def test_wrong_config_is_a_model_error() -> None:
    ck = checkpoint.load(SAMPLE["mlp"])
    with pytest.raises(ModelError, match="no_such_arg"):
        ModelLoader(ref="digits-mlp", config={"no_such_arg": 1}).build(ck)


def test_mismatched_tensors_name_the_tensor() -> None:
    ck = checkpoint.load(SAMPLE["mlp"])
    with pytest.raises(ModelError, match="tensors do not match the model"):
        ModelLoader(ref="digits-cnn").build(ck)


def test_bigger_stored_shape_is_an_error() -> None:
    m = tiny_mlp(hidden=8)
    with pytest.raises(ModelError, match=r"'fc1.weight' has shape \(16, 4\) but the model builds \(8, 4\)"):
        adapt_shapes(m, {"fc1.weight": (16, 4)})


def _shrink_rows(sd: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[keep[k]] if k in keep else v for k, v in sd.items()}


def test_adapts_standard_layers_to_smaller_shapes() -> None:
    torch.manual_seed(0)
    full = zoo.DigitsCNN().eval()
    sd = full.state_dict()
    keep = torch.arange(0, 32, 2)  # half of conv1's filters
    small = dict(sd)
    small["features.0.weight"] = sd["features.0.weight"][keep]
    for k in ("weight", "bias", "running_mean", "running_var"):
        small[f"features.1.{k}"] = sd[f"features.1.{k}"][keep]
    small["features.3.weight"] = sd["features.3.weight"][:, keep]
    ck = Checkpoint(tensors=small, model={"ref": "digits-cnn", "config": {}})
    m = ModelLoader().build(ck)
    assert m.features[0].out_channels == 16 and m.features[1].num_features == 16 and m.features[3].in_channels == 16
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_pruned_channels_that_were_zero_give_same_outputs() -> None:
    """Dropping hidden neurons whose weights are all zero must not change the outputs."""
    torch.manual_seed(0)
    full = zoo.DigitsMLP(hidden=(16,)).eval()
    sd = {k: v.clone() for k, v in full.state_dict().items()}
    dead = torch.tensor([1, 5, 9])
    sd["net.1.weight"][dead] = 0
    sd["net.1.bias"][dead] = 0
    full.load_state_dict(sd)
    alive = torch.tensor([i for i in range(16) if i not in dead.tolist()])
    small = dict(sd)
    small["net.1.weight"], small["net.1.bias"] = sd["net.1.weight"][alive], sd["net.1.bias"][alive]
    small["net.3.weight"] = sd["net.3.weight"][:, alive]
    m = ModelLoader().build(Checkpoint(tensors=small, model={"ref": "digits-mlp", "config": {"hidden": [16]}}))
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(m(x), full(x))


def test_layernorm_embedding_and_transformer_heads_adapt() -> None:
    torch.manual_seed(0)
    t = zoo.DigitsTransformer().eval()
    sd = dict(t.state_dict())
    # Drop two of the four heads (16 dims each) of the first layer's attention.
    keep = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])
    for p in ("q", "k", "v"):
        sd[f"layers.0.{p}.weight"], sd[f"layers.0.{p}.bias"] = sd[f"layers.0.{p}.weight"][keep], sd[f"layers.0.{p}.bias"][keep]
    sd["layers.0.o.weight"] = sd["layers.0.o.weight"][:, keep]
    m = ModelLoader().build(Checkpoint(tensors=sd, model={"ref": "digits-transformer", "config": {}}))
    assert m.layers[0].q.out_features == 32 and m(torch.rand(3, 1, 8, 8)).shape == (3, 10)

    emb, ln = nn.Embedding(10, 6), nn.LayerNorm(6)
    holder = nn.ModuleDict({"emb": emb, "ln": ln})
    adapt_shapes(holder, {"emb.weight": (10, 4), "ln.weight": (4,), "ln.bias": (4,)})
    assert emb.embedding_dim == 4 and ln.normalized_shape == (4,)
    assert ln(emb(torch.tensor([1, 2]))).shape == (2, 4)


def test_entry_point_models_are_trusted(monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path) -> None:
    """A model registered by an installed package (group infercomp.models) needs no flag."""
    from importlib.metadata import EntryPoint

    import infercomp.models as models

    ep = EntryPoint(name="tiny-registered", value="tests.conftest:tiny_mlp", group=models.ENTRY_POINT_GROUP)
    monkeypatch.setattr(models, "entry_points", lambda group: [ep] if group == models.ENTRY_POINT_GROUP else [])
    ck = checkpoint.load(tiny_ckpt)
    ck.model = {"ref": "tiny-registered", "config": {}}
    assert isinstance(ModelLoader().build(ck), nn.Module)
