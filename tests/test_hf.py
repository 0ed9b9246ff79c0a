"""Hugging Face directories: tensors read, transformers' own classes built (trusted), text data
tokenized with the directory's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infercomp import checkpoint
from infercomp.models import ModelLoader
from tests.conftest import invoke

transformers = pytest.importorskip("transformers")

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "man",
    "is",
    "eating",
    "food",
    "the",
    "girl",
    "riding",
    "horse",
    "playing",
    "music",
]


@pytest.fixture
def tiny_bert_dir(tmp_path: Path) -> Path:
    """A 2-layer BERT in Hugging Face layout (config.json, model.safetensors, tokenizer files)."""
    d = tmp_path / "tiny-bert"
    d.mkdir()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32
    )
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(d)
    return d


def test_directory_builds_with_transformers_classes(tiny_bert_dir: Path) -> None:
    ck = checkpoint.load(tiny_bert_dir)
    assert ck.model["ref"] == "hf-auto" and ck.model["config"]["model_type"] == "bert"
    m = ModelLoader().build(ck)  # trusted without flags: transformers' own class
    ref = transformers.BertModel.from_pretrained(tiny_bert_dir).eval()
    ids = torch.tensor([[2, 6, 7, 8, 9, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(m(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_quantize_directory_with_text_data(tiny_bert_dir: Path, tmp_path: Path, runner) -> None:
    text = tmp_path / "sentences.jsonl"
    text.write_text(
        "\n".join(json.dumps({"text": t}) for t in ["a man is eating food", "the girl is riding a horse", "a man is playing music"]) + "\n"
    )
    out = tmp_path / "bert_int8.safetensors"
    r = invoke(runner, "quantize", tiny_bert_dir, "-o", out, "--data", text, "--format", "json", "--min-time", "0.05", "--warmup", "1")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["models"][1]["fidelity"]["cosine_mean"] > 0.99
    assert d["models"][1]["latency_ms"]["median"] > 0
    assert checkpoint.load(out).model["ref"] == "hf-auto"


def test_text_data_without_tokenizer_is_a_clear_error(tmp_path: Path, runner) -> None:
    from tests.conftest import SAMPLE

    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    r = invoke(runner, "report", SAMPLE["mlp"], "--data", text)
    assert r.exit_code == 2 and "needs the model's tokenizer" in r.stderr


def test_padding_is_masked_for_token_id_inputs(tiny_bert_dir: Path) -> None:
    """Text --data is padded to the longest example; the padded example must give the same
    outputs at its real tokens as when run alone."""
    m = ModelLoader().build(checkpoint.load(tiny_bert_dir))
    short = torch.tensor([[2, 6, 7, 3]])
    padded = torch.tensor([[2, 6, 7, 3, 0, 0], [2, 11, 7, 12, 13, 3]])
    with torch.inference_mode():
        alone = m(short).last_hidden_state
        batch = m(padded).last_hidden_state
    torch.testing.assert_close(batch[0, :4], alone[0], atol=1e-5, rtol=1e-4)


def test_jsonl_with_non_integer_label_is_a_clear_error(tiny_bert_dir: Path, tmp_path: Path, runner) -> None:
    text = tmp_path / "d.jsonl"
    text.write_text(json.dumps({"text": "a man", "label": "pos"}) + "\n")
    r = invoke(runner, "report", tiny_bert_dir, "--data", text, "--no-latency")
    assert r.exit_code == 2 and "line 1" in r.stderr and "integer 'label'" in r.stderr


# --------------------------------------------------------------------- Hugging Face directory out


def _with_sentence_transformers_files(d: Path) -> Path:
    (d / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    return d


def _outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state.float()


def test_directory_in_gives_a_directory_transformers_loads(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import infercomp

    src = _with_sentence_transformers_files(tiny_bert_dir)
    out = tmp_path / "bf16-model"
    infercomp.quantize(src, out, scheme="bf16", measure=False)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    copied = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")}
    assert copied <= names and {"modules.json", "1_Pooling/config.json", "tokenizer_config.json"} <= copied
    assert {"config.json", "model.safetensors"} <= names
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = torch.tensor([[2, 6, 7, 8, 9, 3]])
    ref = _outputs(transformers.AutoModel.from_pretrained(src).eval(), ids)
    got = _outputs(transformers.AutoModel.from_pretrained(out).eval(), ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min() > 0.999
    text = "a man is eating food"
    assert (
        transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == transformers.AutoTokenizer.from_pretrained(src)(text)["input_ids"]
    )
    assert checkpoint.load(out).history[-1]["transform"] == "quantize"  # our metadata rides in the shards


def test_int8_dynamic_directory_uses_compressed_tensors_and_shards(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import infercomp

    out = tmp_path / "w8a8"
    infercomp.quantize(tiny_bert_dir, out, scheme="int8-dynamic", measure=False, max_shard_size="20KB")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert index["weight_map"]["encoder.layer.0.attention.self.query.weight"] in shards
    back = checkpoint.load(out)  # infercomp reads its own directory back, encodings included
    assert back.encodings["encoder.layer.0.attention.self.query.weight"]["codec"] == "int8-dynamic"
    pytest.importorskip("compressed_tensors")
    ids = torch.tensor([[2, 6, 7, 8, 9, 3]])
    ref = _outputs(transformers.AutoModel.from_pretrained(tiny_bert_dir).eval(), ids)
    got = _outputs(transformers.AutoModel.from_pretrained(out).eval(), ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min() > 0.99


@pytest.mark.slow
def test_what_a_directory_cannot_hold_is_refused_before_writing(tiny_bert_dir: Path, tmp_path: Path, runner) -> None:
    out = tmp_path / "out"
    for args, needle in (
        (("quantize", "--scheme", "int8"), "pack-quantized"),
        (("quantize", "--scheme", "int4"), "pack-quantized"),
        (("prune", "--method", "channel", "--sparsity", "0.5"), "config.json cannot describe"),
    ):
        r = invoke(runner, args[0], tiny_bert_dir, "-o", out, *args[1:], "--no-latency")
        assert r.exit_code == 2 and needle in r.stderr, r.stderr
        assert not out.exists()
    single = tmp_path / "one.safetensors"  # a file name still gives one file, any scheme
    r = invoke(runner, "quantize", tiny_bert_dir, "-o", single, "--scheme", "int4", "--no-latency")
    assert r.exit_code == 0, r.output
    assert single.is_file()
    r = invoke(runner, "quantize", tiny_bert_dir, "-o", out, "--scheme", "fp16", "--no-latency")
    assert r.exit_code == 0 and (out / "model.safetensors").exists()
    r = invoke(runner, "quantize", tiny_bert_dir, "-o", out, "--scheme", "bf16", "--no-latency")
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = invoke(runner, "quantize", tiny_bert_dir, "-o", out, "--scheme", "bf16", "--no-latency", "--force")
    assert r.exit_code == 0 and json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "out", "tiny-bert", "vocab.txt"]  # no temp dirs left
