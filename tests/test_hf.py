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
