"""Streaming weight-only transforms (``infercomp.stream``): the same bytes as the in-memory path,
sharded inputs and outputs, the exact global threshold, and bounded memory on a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import infercomp
from infercomp import allocator, checkpoint, measure
from infercomp.checkpoint import Checkpoint
from infercomp.errors import UsageError
from infercomp.prune import PruneConfig
from infercomp.prune.magnitude import Selection, keep_largest, kept_count, near, score_masks
from infercomp.stream import wanted as stream_wanted
from tests.conftest import invoke

MB = 1 << 20


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Small tensors of every kind a transform meets: Linear / conv / embedding weights, biases,
    norms, a bf16 weight, rows that 32 does not divide, and many tied magnitudes."""
    g = torch.Generator().manual_seed(seed)
    ties = torch.randint(-3, 4, (16, 64), generator=g).float() / 4  # few distinct |w|: ties across tensors
    return {
        "emb.weight": torch.randn(40, 64, generator=g),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "fc1.weight": torch.randn(64, 96, generator=g),
        "fc1.bias": torch.randn(64, generator=g),
        "fc2.weight": ties,
        "fc3.weight": torch.randint(-2, 3, (8, 64), generator=g).float() / 4,
        "odd.weight": torch.randn(6, 20, generator=g),  # 20 inputs: no 32-groups, no 8-groups
        "norm.weight": torch.ones(64),
        "half.weight": torch.randn(32, 64, generator=g).to(torch.bfloat16),
        "steps": torch.arange(5),
    }


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """Written by the safetensors library (its own tensor order, not sorted by name)."""
    p = tmp_path / "src.safetensors"
    save_file(_tensors(), str(p))
    return p


def _both(verb, src: Path, tmp_path: Path, tag: str, suffix: str = ".safetensors", **kw) -> tuple[Path, Path]:
    outs = []
    for stream in (False, True):
        out = tmp_path / f"{tag}-{'stream' if stream else 'memory'}{suffix}"
        verb(src, out, stream=stream, measure=False, **kw)
        outs.append(out)
    return outs[0], outs[1]


def _same_files(a: Path, b: Path) -> None:
    if a.is_file():
        assert a.read_bytes() == b.read_bytes(), f"{a.name} and {b.name} differ"
        return
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), f"{n} differs"


PRUNES = {
    "global": {},
    "layer": {"scope": "layer"},
    "2:4": {"method": "2:4"},
    "1:8": {"method": "2:4", "n": 1, "m": 8},
    "global-include": {"include": ["fc*"], "sparsity": 0.7},
}
QUANTS = {
    "int8": {},
    "int8-group": {"group_size": 32, "column_scales": False},
    "int8-dynamic": {"scheme": "int8-dynamic"},
    "int4": {"scheme": "int4"},
    "int4-asym": {"scheme": "int4", "asymmetric": True, "group_size": 64, "column_scales": True},
    "fp8": {"scheme": "fp8"},
    "fp16": {"scheme": "fp16"},
    "bf16": {"scheme": "bf16", "exclude": ["emb"]},
}


@pytest.mark.parametrize("case", PRUNES)
def test_streamed_prune_writes_the_same_bytes(src: Path, tmp_path: Path, case: str) -> None:
    memory, streamed = _both(infercomp.prune, src, tmp_path, case, **PRUNES[case])
    _same_files(memory, streamed)
    assert checkpoint.load(streamed).encodings  # something was stored sparse: the test compares real work


@pytest.mark.parametrize("case", QUANTS)
def test_streamed_quantize_writes_the_same_bytes(src: Path, tmp_path: Path, case: str) -> None:
    memory, streamed = _both(infercomp.quantize, src, tmp_path, case, **QUANTS[case])
    _same_files(memory, streamed)


@pytest.mark.parametrize("scheme", ["int4", "bf16"])
def test_streamed_quantize_of_a_pruned_input_writes_the_same_bytes(src: Path, tmp_path: Path, scheme: str) -> None:
    """Encoded inputs: decoded for int4 (as the in-memory path does), kept sparse by bf16."""
    pruned = tmp_path / "pruned.safetensors"
    infercomp.prune(src, pruned, sparsity=0.6, measure=False)
    memory, streamed = _both(infercomp.quantize, pruned, tmp_path, scheme, scheme=scheme)
    _same_files(memory, streamed)


@pytest.mark.parametrize(
    ("verb", "case"),
    [(infercomp.prune, "global"), (infercomp.prune, "layer"), (infercomp.quantize, "int8"), (infercomp.quantize, "int4")],
)
def test_streamed_static_figures_match_reading_both_files(src: Path, tmp_path: Path, verb, case: str) -> None:
    """The walk counts the non-zeros it reads and writes; the comparison built from those counts
    gives the figures ``static_stats`` reads from the two files."""
    pruned = tmp_path / "pruned.safetensors"  # an encoded input too: some tensors are kept sparse
    infercomp.prune(src, pruned, sparsity=0.3, include=["fc1"], measure=False)
    out = tmp_path / "out.safetensors"
    result = verb(pruned, out, stream=True, latency=False, **(PRUNES if verb is infercomp.prune else QUANTS)[case])
    for report, path in zip(result.models, (pruned, out)):
        stats = measure.static_stats(checkpoint.load(path))
        assert {k: getattr(report, k) for k in stats} == stats, path.name


def test_streamed_prune_of_a_quantized_input_keeps_it_encoded(src: Path, tmp_path: Path) -> None:
    q = tmp_path / "q.safetensors"
    infercomp.quantize(src, q, scheme="int8", include=["emb"], measure=False)
    memory, streamed = _both(infercomp.prune, q, tmp_path, "pq", exclude=["emb"])
    _same_files(memory, streamed)
    assert checkpoint.load(streamed).encodings["emb.weight"]["codec"] == "int8"


def _hf_dir(tmp_path: Path) -> Path:
    """A Hugging Face directory in three shards with an index (a tiny BERT)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32
    )
    d = tmp_path / "bert"
    transformers.BertModel(cfg).eval().save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    assert len(list(d.glob("*.safetensors"))) >= 3 and (d / "model.safetensors.index.json").exists()
    return d


def test_sharded_input_streams_into_one_file(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path)
    for scheme in ("int4", "fp8"):
        memory, streamed = _both(infercomp.quantize, d, tmp_path, scheme, scheme=scheme)  # shards in, one file out
        _same_files(memory, streamed)
    memory, streamed = _both(infercomp.prune, d, tmp_path, "prune", method="2:4")
    _same_files(memory, streamed)


@pytest.mark.parametrize(
    ("verb", "kw"),
    [
        ("quantize", {"scheme": "int8"}),
        ("quantize", {"scheme": "int4"}),
        ("quantize", {"scheme": "int8-dynamic"}),
        ("quantize", {"scheme": "fp8"}),
        ("quantize", {"scheme": "bf16"}),
        ("quantize", {"scheme": "int4", "column_scales": True}),
        ("prune", {}),
        ("prune", {"method": "2:4"}),
    ],
)
def test_a_directory_output_streams_into_the_same_directory(tmp_path: Path, verb: str, kw: dict) -> None:
    """Sharded Hugging Face directory in, sharded directory out (--max-shard-size): streamed, the
    same files byte for byte as in memory (config.json with its compressed-tensors config, the
    shards, the index, the copied tokenizer / config files)."""
    d = _hf_dir(tmp_path)
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    outs = []
    for stream in (False, True):
        out = tmp_path / f"out-{stream}"
        getattr(infercomp, verb)(d, out, stream=stream, measure=False, max_shard_size=4_000, **kw)
        outs.append(out)
    _same_files(*outs)
    assert (outs[1] / "model.safetensors.index.json").exists() and (outs[1] / "vocab.txt").exists()
    assert len(list(outs[1].glob("model-*.safetensors"))) >= 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no spool or temp directory left


def test_a_large_input_read_whole_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto mode on an input over the streaming size that cannot stream: a note, not silence (a
    28 GB model read whole is the user's to stop)."""
    from tests.test_prune import Log

    d = _hf_dir(tmp_path)
    monkeypatch.setattr(sys.modules[stream_wanted.__module__], "STREAM_ABOVE", 0)
    log = Log()
    assert not stream_wanted(d, tmp_path / "out", PruneConfig(method="channel"), None, log)
    assert any("read whole into memory (not streamed: --method channel needs the whole model" in line for line in log.lines), log.lines
    log = Log()
    assert stream_wanted(d, tmp_path / "out", PruneConfig(), None, log) and not log.lines


def test_global_threshold_is_exact_with_ties() -> None:
    """The histogram selection keeps exactly what a stable sort of the concatenation
    keeps, ties broken by position across tensors (and NaN / inf ranked as sort ranks them)."""
    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        parts = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            n = int(torch.randint(1, 300, (1,), generator=g))
            t = torch.randint(0, 4, (n,), generator=g).float() * [1.0, 1e-30, 3e8][trial % 3]
            if trial % 7 == 0:
                t[::5] = float("inf")
                t[::9] = float("nan")
            parts.append(t)
        sparsity = float(torch.rand(1, generator=g))
        flat = torch.cat(parts)
        expected = keep_largest(flat, kept_count(flat.numel(), sparsity))
        masks = score_masks({str(i): p for i, p in enumerate(parts)}, sparsity, "global")
        assert torch.equal(torch.cat(list(masks.values())), expected), trial
        assert int(expected.sum()) == kept_count(flat.numel(), sparsity)
    s = torch.zeros(10)
    assert Selection.of(lambda: [s], 0).mask(s).sum() == 0 and Selection.of(lambda: [s], 10).mask(s).all()


def test_global_threshold_window_takes_one_pass_and_never_changes_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampled guess (``near``) lets the first pass find the threshold on weights of LLM-like
    spread (one pass); any window, right, wrong or absurd, gives the same key and ties as none."""
    magnitude = sys.modules[Selection.__module__]
    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(300, 200, generator=g) * sd for sd in (0.02, 0.05, 0.01)] + [torch.ones(200)]
    reads: list[int] = []

    def scores() -> list[torch.Tensor]:
        reads.append(1)
        return parts

    for sparsity in (0.1, 0.5, 0.9):
        k = kept_count(sum(p.numel() for p in parts), sparsity)
        reads.clear()
        plain = Selection.of(scores, k, magnitudes=True)
        assert plain.passes == 2 and len(reads) == 2
        reads.clear()
        window = near(parts, k, magnitudes=True)
        guessed = Selection.of(scores, k, magnitudes=True, window=window)
        assert (guessed.key, guessed.ties) == (plain.key, plain.ties)
        assert guessed.passes == 1 and len(reads) == 1, (sparsity, window, plain.key)
        key = plain.key
        for wrong in (
            (0, 0),
            (key + (1 << 20), key + (1 << 21)),
            (0, 0x7FC00000),
            (key - (1 << 16), key - (1 << 16)),
            (key + (1 << 17), key),
            (-(1 << 40), 1 << 40),
        ):
            other = Selection.of(scores, k, magnitudes=True, window=wrong)
            assert (other.key, other.ties) == (plain.key, plain.ties), wrong
        # The window's int32 counts widen to int64 before they could overflow: the same result.
        with monkeypatch.context() as m:
            m.setattr(magnitude, "_INT32_MAX", 10)
            widened = Selection.of(scores, k, magnitudes=True, window=window)
        assert (widened.key, widened.ties, widened.passes) == (plain.key, plain.ties, 1)
    counts, ones = torch.zeros(3, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    assert magnitude._wide_enough(counts, ones, (1 << 31) - 1)[0].dtype == torch.int32
    assert [t.dtype for t in magnitude._wide_enough(counts, ones, 1 << 31)] == [torch.int64, torch.int64]
    assert near([], 3) is None and near([torch.ones(4)], 0) is None


def test_streamed_global_prune_breaks_ties_like_memory(tmp_path: Path) -> None:
    """All weights of equal magnitude: which ones survive is decided by position alone."""
    p = tmp_path / "flat.safetensors"
    save_file({"b.weight": torch.full((8, 8), -0.5), "a.weight": torch.full((4, 8), 0.5)}, str(p))
    memory, streamed = _both(infercomp.prune, p, tmp_path, "ties", sparsity=0.4)
    _same_files(memory, streamed)
    ck = checkpoint.load(streamed)
    assert measure.static_stats(ck)["nonzero"] == 96 - round(0.4 * 96)


def test_stream_that_cannot_is_a_usage_error(src: Path, tmp_path: Path, runner) -> None:
    with pytest.raises(UsageError, match="--stream"):
        infercomp.prune(src, tmp_path / "c.safetensors", method="channel", stream=True, measure=False)
    result = invoke(runner, "quantize", src, "-o", tmp_path / "g.safetensors", "--method", "gptq", "--stream")
    assert result.exit_code == 2 and "--stream" in result.stderr


def test_cli_stream_flag_and_static_report(src: Path, tmp_path: Path, runner) -> None:
    out = tmp_path / "cli.safetensors"
    result = invoke(runner, "prune", src, "-o", out, "--stream", "--format", "json", "--no-latency")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["models"][1]["sparsity"] > 0.3
    lazy = checkpoint.load(out, lazy=True)
    assert measure.static_stats(lazy) == measure.static_stats(checkpoint.load(out))
    result = invoke(runner, "report", out, "--format", "json", "--layers")
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["models"][0]
    assert set(model) >= {"size_bytes", "parameters", "nonzero", "sparsity", "bits_per_weight", "layers"}
    assert {row["name"] for row in model["layers"]} >= {"fc1.weight", "conv.weight"}


def test_a_failed_stream_leaves_nothing(src: Path, tmp_path: Path) -> None:
    bad = tmp_path / "nan.safetensors"
    t = _tensors()
    t["fc1.weight"][3, 3] = float("nan")
    save_file(t, str(bad))
    with pytest.raises(infercomp.errors.CheckpointError, match="fc1.weight"):
        infercomp.quantize(bad, tmp_path / "out.safetensors", stream=True, measure=False)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["nan.safetensors", "src.safetensors"]


# ------------------------------------------------------------------------- bounded memory


def _peak_rss(*args: str) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Peak RSS (bytes) of a fresh Python child running ``args`` (getrusage of that child alone)."""
    code = (
        "import os, resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(p.stdout[-2000:]); sys.stderr.write(p.stderr[-2000:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(p.returncode)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"}
    )
    return int(proc.stdout.strip().splitlines()[-1]), proc


@pytest.mark.slow
def test_streaming_keeps_memory_bounded(tmp_path: Path) -> None:
    """A ~200 MB checkpoint of 8 MB tensors: the CLI quantizing or pruning it (streaming forced) peaks
    far below the file size on top of what the interpreter takes to import infercomp."""
    g = torch.Generator().manual_seed(0)
    big = tmp_path / "big.safetensors"
    tensors = {f"layers.{i}.fc.weight": torch.randn(1024, 2048, generator=g) for i in range(24)}  # 24 x 8 MiB
    checkpoint.save(Checkpoint(tensors=tensors), big)
    del tensors
    size = big.stat().st_size
    assert size > 190 * MB
    base, _ = _peak_rss(sys.executable, "-c", "import infercomp.cli, infercomp.stream")
    cli = [sys.executable, "-m", "infercomp"]
    for args in (["quantize", "--scheme", "int8"], ["prune", "--sparsity", "0.5"]):
        out = tmp_path / f"{args[0]}.safetensors"
        peak, proc = _peak_rss(*cli, args[0], str(big), "-o", str(out), *args[1:], "--stream", "--no-latency", "-q")
        assert proc.returncode == 0, proc.stderr
        # One 8 MiB tensor and its transform's temporaries (a few times its size), never the file.
        assert peak - base < 80 * MB < size / 2, (args, peak / MB, base / MB)
        assert checkpoint.load(out, lazy=True).encodings


def test_the_allocator_is_changed_only_where_no_model_is_timed(src: Path, tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """Handing freed blocks back at once (process-wide, irreversible) makes every large activation
    a fresh mmap and slows a forward pass: a report or streamed run that times a model must not
    set it; one that builds none does, to stay in bounded memory."""
    calls: list[int] = []
    monkeypatch.setattr(allocator, "for_streaming", lambda: calls.append(1))
    checkpoint.load(src, lazy=True)
    assert not calls  # reading lazily alone leaves the allocator as it is
    ref = "tests.conftest:tiny_mlp"
    infercomp.report([tiny_ckpt], model=ref, latency=False)
    infercomp.prune(tiny_ckpt, tmp_path / "t.safetensors", model=ref, stream=True)  # small, buildable: measured as in memory
    assert not calls
    infercomp.report([src])  # nothing to build: static figures, read lazily
    assert len(calls) == 1
    infercomp.prune(src, tmp_path / "s.safetensors", stream=True)
    assert len(calls) == 2


def test_an_interrupted_directory_stream_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the shards are written: neither the directory, nor its temp directory, nor
    either spool is left; an existing output survives."""
    d = _hf_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier output (--force replaces only a model directory)
    (out / "keep.txt").write_text("old")
    spool_type = sys.modules[stream_wanted.__module__]._Spool
    real = spool_type.write
    calls: list[Path] = []

    def interrupted(self, path: Path, names: list[str], metadata: dict[str, str]) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, path, names, metadata)

    monkeypatch.setattr(spool_type, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        infercomp.quantize(d, out, scheme="int8", stream=True, measure=False, max_shard_size=4_000, force=True)
    assert len(calls) == 2 and calls[0].parent.name.startswith(".out.")  # the first shard went into the temp directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "out"] and (out / "keep.txt").read_text() == "old"
