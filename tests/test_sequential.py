"""GPTQ and wanda on a Hugging Face causal LM go one block at a time (``infercomp.blocks``): one
block's weights held at once, read tensor by tensor; GPTQ gives the whole-model path's integers
exactly; wanda the Wanda authors' sequential masks (block 0 exactly the whole-model path's); the
output loads in transformers with its perplexity close to the original's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import infercomp
import infercomp.blocks as blocks
from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.errors import UsageError
from infercomp.models import ModelLoader
from infercomp.prune import PruneConfig
from tests.test_hf_llm import SENTENCES, WORDS, _hf_perplexity, make_llama

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # trains and calibrates small LLMs: make test runs them, make test-fast does not


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a 3-block Llama, untied output layer, trained 20 steps; its sentences as .txt)."""
    root = tmp_path_factory.mktemp("seq")
    make_llama(root / "llama3", layers=3, tied=False, steps=20)
    text = root / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    return root / "llama3", text


def _both(fn, src: Path, tmp_path: Path, text: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> tuple[dict, dict]:
    """Stored tensors of the block-by-block and of the whole-model outputs."""
    out = {}
    for seq in (True, False):
        monkeypatch.setattr(blocks, "SEQUENTIAL", seq)
        path = tmp_path / f"{seq}.safetensors"
        fn(src, path, data=text, measure=False, **kw)
        out[seq] = checkpoint.load(path).tensors
    return out[True], out[False]


@pytest.mark.parametrize("tied", [False, True])
def test_one_block_is_held_at_a_time_and_read_tensor_by_tensor(tmp_path: Path, llama3: tuple[Path, Path], tied: bool) -> None:
    src = llama3[0] if not tied else tmp_path / "tied"
    if tied:  # lm_head is the embedding: stored once, read under that one name
        make_llama(src, layers=3, tied=True, steps=0)
    lazy = checkpoint.load(src, lazy=True)  # read from disk when asked: nothing is held
    decoder = blocks.skeleton(ModelLoader().spec_for(lazy), lazy.tensors)
    assert decoder is not None and decoder.path == "model.layers"
    seen: list[tuple[str, list[int], list[str]]] = []
    targets = {n for n, m in decoder.model.named_modules() if isinstance(m, torch.nn.Linear)}

    def outside_held() -> list[str]:
        return sorted(n for n, p in decoder.model.named_parameters() if not n.startswith("model.layers.") and p.device.type != "meta")

    def compress(stage: blocks.Stage) -> None:
        assert all(m.weight.device.type == "cpu" for _, m in stage.layers)
        seen.append((stage.name, blocks.materialised(decoder), outside_held()))

    ids = torch.randint(4, len(WORDS), (5, 7))
    blocks.calibrate(decoder, lazy.tensors, ids, targets, compress, batch_size=2)
    everything_outside = sorted(n for n, _ in decoder.model.named_parameters() if not n.startswith("model.layers."))
    # One block at a time and nothing from outside the blocks beside it; lm_head after the blocks,
    # with what the replay through the whole model needs.
    assert seen == [(f"model.layers.{j}", [j], []) for j in range(3)] + [("tail", [], everything_outside)]
    assert blocks.materialised(decoder) == [] and outside_held() == []
    # The embeddings first (to record the blocks' inputs), the blocks in order, then everything
    # outside the blocks for the tail: each stored tensor read once, the embeddings twice.
    embed = "model.embed_tokens.weight"
    assert decoder.reads[0] == embed and decoder.reads.count(embed) == 2
    assert sorted(set(decoder.reads)) == sorted(lazy.tensors) and len(decoder.reads) == len(lazy.tensors) + 1
    order = [int(n.split(".")[2]) for n in decoder.reads if n.startswith("model.layers.")]
    assert order == sorted(order) and decoder.reads[1 : 1 + len(order)] == [n for n in decoder.reads if n.startswith("model.layers.")]


def test_gptq_block_by_block_gives_the_whole_model_integers(
    tmp_path: Path, llama3: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, text = llama3
    built = []
    real = ModelLoader.build
    monkeypatch.setattr(ModelLoader, "build", lambda self, ckpt, **kw: built.append(ckpt.name) or real(self, ckpt, **kw))
    seq, whole = _both(infercomp.quantize, src, tmp_path, text, monkeypatch, scheme="int4", method="gptq")
    assert built == [str(src)]  # only the whole-model path built the model
    assert sorted(seq) == sorted(whole)
    assert checkpoint.load(tmp_path / "True.safetensors").encodings["lm_head.weight"]["method"] == "gptq"  # the tail stage
    assert [k for k in seq if not torch.equal(seq[k], whole[k])] == []


def test_sparsegpt_block_by_block_gives_the_whole_model_weights(
    tmp_path: Path, llama3: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each layer's Hessian is collected on inputs that passed the layers before it pruned, in both
    paths: the same inputs, so the same masks and updated weights."""
    src, text = llama3
    seq, whole = _both(infercomp.prune, src, tmp_path, text, monkeypatch, method="sparsegpt", n=2, m=4)
    assert sorted(seq) == sorted(whole) and any(k.startswith("model.layers.2.") and k.endswith(".bitmask") for k in seq)
    assert [k for k in seq if not torch.equal(seq[k], whole[k])] == []


def test_wanda_block_by_block_matches_the_whole_model_on_block_0_and_stays_close(
    tmp_path: Path, llama3: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, text = llama3
    seq, whole = _both(infercomp.prune, src, tmp_path, text, monkeypatch, method="wanda", sparsity=0.5)
    assert sorted(seq) == sorted(whole)
    first = [k for k in seq if k.startswith("model.layers.0.")]
    assert first and all(torch.equal(seq[k], whole[k]) for k in first)  # the same inputs reach block 0
    # Later blocks see the pruned blocks' outputs (as the Wanda authors' code does): most of the
    # kept weights are the same ones.
    bits = torch.arange(8, dtype=torch.uint8)
    masks = [
        (seq[k][..., None] >> bits & 1, whole[k][..., None] >> bits & 1)
        for k in seq
        if k.endswith(".bitmask") and not k.startswith("model.layers.0.")
    ]
    same = sum(int((a == b).sum()) for a, b in masks) / sum(a.numel() for a, _ in masks)
    print(f"mask bits agreeing after block 0: {same:.3f}")
    assert 0.9 < same < 1.0


@pytest.mark.parametrize(
    "verb,kw,bound",
    [("quantize", {"scheme": "int4", "method": "gptq"}, 1.5), ("prune", {"method": "wanda"}, 3.0), ("prune", {"method": "sparsegpt"}, 3.0)],
)
def test_output_loads_in_transformers_with_perplexity_close(
    tmp_path: Path, llama3: tuple[Path, Path], verb: str, kw: dict, bound: float
) -> None:
    src, text = llama3
    out = tmp_path / "out"
    getattr(infercomp, verb)(src, out, data=text, measure=False, **kw)
    before, after = _hf_perplexity(src), _hf_perplexity(out)
    assert before < after < bound * before


def test_other_models_are_built_whole(tiny_ckpt: Path) -> None:
    """No Hugging Face reference, or a config that does not build a causal LM: None."""
    ckpt = checkpoint.load(tiny_ckpt)
    assert blocks.skeleton(ModelLoader().spec_for(ckpt), ckpt.tensors) is None
    assert blocks.skeleton({"ref": "hf-auto", "config": {"model_type": "bert", "num_hidden_layers": 1}}, {}) is None
    assert blocks.skeleton(None, Checkpoint(tensors={}).tensors) is None


@pytest.mark.parametrize(
    ("verb", "kw"),
    [
        ("quantize", {"scheme": "int4", "method": "gptq"}),
        ("prune", {"method": "wanda", "sparsity": 0.5}),
        ("prune", {"method": "wanda", "n": 2, "m": 4}),
        ("prune", {"method": "sparsegpt", "sparsity": 0.5}),
    ],
)
def test_streamed_calibration_writes_the_in_memory_bytes(tmp_path: Path, llama3: tuple[Path, Path], verb: str, kw: dict) -> None:
    """--stream on a causal LM: read lazily, calibrated block by block, written through the spool:
    the same file as the in-memory run (which loads everything first)."""
    src, text = llama3
    streamed, whole = tmp_path / "streamed.safetensors", tmp_path / "whole.safetensors"
    getattr(infercomp, verb)(src, streamed, data=text, measure=False, stream=True, **kw)
    getattr(infercomp, verb)(src, whole, data=text, measure=False, stream=False, **kw)
    assert streamed.read_bytes() == whole.read_bytes()


def test_bias_correction_block_by_block_streams_the_same_bytes(
    tmp_path: Path, llama3: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A causal LM with biases, wanda --bias-correction block by block: streamed and in memory the
    same file; every pruned projection's bias moved, block 0's weights are plain wanda's (later
    blocks calibrate on corrected ones), and transformers loads and scores it. Masks unrefined
    (``refine=False``): refined ones are chosen for the error the bias leaves, so they differ."""
    text = llama3[1]
    src = tmp_path / "biased"
    make_llama(src, layers=2, tied=False, steps=10, bias=True)
    outs = {}
    for key, kw in (("streamed", {"stream": True}), ("whole", {"stream": False}), ("out", {})):
        outs[key] = tmp_path / (f"{key}.safetensors" if key != "out" else "out")
        infercomp.prune(src, outs[key], method="wanda", bias_correction=True, refine=False, data=text, measure=False, **kw)
    assert outs["streamed"].read_bytes() == outs["whole"].read_bytes()
    infercomp.prune(src, tmp_path / "plain.safetensors", method="wanda", refine=False, data=text, measure=False)
    plain, corrected = checkpoint.load(tmp_path / "plain.safetensors"), checkpoint.load(outs["whole"])
    assert plain.encodings.keys() == corrected.encodings.keys()
    biases = {n.replace(".weight", ".bias") for n in plain.encodings if n.startswith("model.layers.")}
    assert len(biases) == 2 * 7
    for name in biases:
        assert not torch.equal(plain.tensors[name], corrected.tensors[name]), name
    for name, t in plain.tensors.items():  # block 0 saw the same inputs: plain wanda's masks; later ones see corrected blocks
        if name.startswith("model.layers.0.") and name not in biases:
            assert torch.equal(t, corrected.tensors[name]), name
    assert _hf_perplexity(outs["out"]) < 3 * _hf_perplexity(src)
    # In batches of 5 sentences (padding in each): each batch's mask picks its real tokens, so the
    # means, and the biases, are the one-batch run's.
    monkeypatch.setattr(sys.modules[PruneConfig.__module__], "WANDA_BATCH", 5)
    infercomp.prune(src, tmp_path / "batched.safetensors", method="wanda", bias_correction=True, refine=False, data=text, measure=False)
    batched = checkpoint.load(tmp_path / "batched.safetensors")
    assert len(SENTENCES) > 10
    for name in biases:
        torch.testing.assert_close(batched.tensors[name], corrected.tensors[name], atol=1e-5, rtol=1e-4)


def test_calibrated_streaming_is_for_causal_lms_stored_in_float(tiny_ckpt: Path, tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="streams a Hugging Face causal LM stored in float only"):
        infercomp.prune(tiny_ckpt, tmp_path / "o.safetensors", method="wanda", data=tiny_data, stream=True, measure=False)


def test_a_causal_lm_streams_into_a_directory_transformers_loads(tmp_path: Path, llama3: tuple[Path, Path]) -> None:
    """GPTQ block by block, streamed into a sharded Hugging Face directory: the in-memory
    directory's bytes, and AutoModelForCausalLM loads it."""
    src, text = llama3
    outs = []
    for stream in (False, True):
        out = tmp_path / f"dir-{stream}"
        infercomp.quantize(src, out, scheme="int4", method="gptq", data=text, measure=False, stream=stream, max_shard_size=20_000)
        outs.append(out)
    names = sorted(f.name for f in outs[0].iterdir())
    assert names == sorted(f.name for f in outs[1].iterdir()) and "model.safetensors.index.json" in names
    assert all((outs[0] / n).read_bytes() == (outs[1] / n).read_bytes() for n in names)
    assert _hf_perplexity(outs[1]) < 1.5 * _hf_perplexity(src)
