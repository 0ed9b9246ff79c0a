"""Layer-by-layer GPTQ and wanda (``infercomp.blocks``) on a causal LM larger than a memory limit.

Makes a Llama-style model with random weights (hidden 2048, 8 blocks, FFN 5632, vocabulary 32000:
~2 GB of float32 safetensors; ``--blocks N``: N blocks of 0.2 GB each; ``--quick``: hidden 1024,
4 blocks, FFN 2816, ~0.5 GB) and a word
tokenizer, then, for ``--methods gptq`` (int4), ``wanda`` (50 %) and ``int4-dir`` (round to
nearest, streamed into a sharded Hugging Face directory), runs children and prints each
one's peak RSS (``os.wait4``'s rusage) and wall time:

- ``streamed, block by block``: ``infercomp.quantize|prune(..., stream=True, measure=False)``: the
  input read lazily, calibrated one decoder block at a time (``infercomp.blocks``), each tensor
  encoded and spooled to disk as it comes (``infercomp.stream``; the CLI's ``--stream``);
- ``in memory``: the same verb with ``stream=False``: the whole input read first.
Both run once without a limit (their outputs compared byte for byte), then both under an
``RLIMIT_AS`` halfway between the streamed run's virtual peak and the model's size on disk when
that peak is below the size (the model is then larger than the limit: the bench says so), else
halfway to what reading every weight once needs: the in-memory run must fail there. ``--cli`` adds the command as users run it
(``--no-latency``, comparison included), block by block and whole model, without a limit.

The limit. ``RLIMIT_AS`` caps *virtual* memory, and a process that has imported torch and
transformers has reserved a lot of it before any weight is read (thread stacks, allocator arenas,
mapped libraries). So the bench first measures that: a child imports everything and reports its
VmPeak (``/proc/self/status``); the limit is that plus ``LIMIT_FRACTION`` of the model's bytes on
disk. Reading every weight once (let alone a model built from them) then cannot fit. A cgroup's
``memory.max`` would cap resident memory instead, but needs a writable cgroup, which this machine
does not give.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_FRACTION = 0.75  # of the model's bytes, on top of the imported process's virtual size
WORDS = "the a man woman dog cat boy girl eats runs reads plays sits rides big small red blue old new in on at park house city book music food horse bike".split()


def make_model(d: Path, *, quick: bool, blocks: int | None = None) -> None:
    import tokenizers
    import torch
    import transformers

    hidden, layers, ffn = (1024, 4, 2816) if quick else (2048, 8, 5632)
    layers = blocks or layers
    d.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "<s>", "</s>", *WORDS]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.pad_token = "[PAD]"
    fast.save_pretrained(d)
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 512,
        intermediate_size=ffn,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():  # random weights, a block at a time (the bench itself stays small)
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb.__init__(cfg)  # its frequencies (not stored) were left empty by to_empty
    model.eval().save_pretrained(d, max_shard_size="5GB")


def sentences(path: Path, n: int) -> None:
    import random

    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(n)) + "\n")


# ------------------------------------------------------------------------------------- children


def child_api(src: str, out: str, method: str, text: str, stream: bool) -> None:
    """The public verb, streamed (read lazily, calibrated block by block, spooled) or in memory
    (the whole input read first); measure=False: the transform's own memory, no comparison run."""
    import infercomp

    if method == "gptq":
        infercomp.quantize(src, out, scheme="int4", method="gptq", calib_samples=32, data=text, stream=stream, measure=False, force=True)
    elif method == "int4-dir":  # round to nearest into a sharded Hugging Face directory (compressed-tensors)
        infercomp.quantize(src, out, scheme="int4", stream=stream, measure=False, force=True, max_shard_size=200 * 10**6)
    else:
        infercomp.prune(src, out, method="wanda", sparsity=0.5, data=text, stream=stream, measure=False, force=True)
    print(json.dumps({"vm": _vm_peak()}))


def _contents(p: Path) -> dict[str, bytes]:
    """A file's bytes (under no name: the two outputs compared have different names), or a
    directory's files' (by name)."""
    return {f.name: f.read_bytes() for f in sorted(p.iterdir())} if p.is_dir() else {"": p.read_bytes()}


def child_cli(argv: list[str], sequential: bool) -> None:
    import infercomp.blocks as blocks
    from infercomp.cli import main

    blocks.SEQUENTIAL = sequential
    sys.argv = ["infercomp", *argv]
    main()


def child_baseline() -> None:
    import infercomp.blocks  # noqa: F401  (everything a run imports)
    import infercomp.cli  # noqa: F401
    import infercomp.hf as hf
    import infercomp.prune  # noqa: F401
    import infercomp.stream  # noqa: F401

    hf._transformers()
    print(json.dumps({"vm": _vm_peak()}))


def _vm_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------- parent


def run_child(args: list[str], *, limit: int | None = None) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in MiB, wall seconds, last stderr line) of ``bench_sequential.py ARGS``,
    the peak from the child's own rusage (``os.wait4``), under ``RLIMIT_AS`` = ``limit``."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, __file__, *args], env=env, preexec_fn=cap, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    lines = [x for x in errors.strip().splitlines() if x.strip() and "Warning" not in x and "torchao" not in x]
    return rc, usage.ru_maxrss / 1024, wall, (text.strip().splitlines() or [""])[-1] if rc == 0 else (lines[-1] if lines else "")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # a measured child (parsed here: its own arguments include -o)
        kind, *rest = sys.argv[2:]
        if kind == "make":
            make_model(Path(rest[0]), quick=rest[1] == "1", blocks=int(rest[2]) or None)
        elif kind == "baseline":
            child_baseline()
        elif kind == "api":
            child_api(rest[0], rest[1], rest[2], rest[3], rest[4] == "1")
        else:
            child_cli(rest[1:], rest[0] == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="hidden 1024, 4 blocks (~0.5 GB)")
    ap.add_argument("--blocks", type=int, default=0, help="decoder blocks (default 8, --quick 4); each full-size block is 0.2 GB")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/infercomp-bench-sequential"))
    ap.add_argument("--methods", default="gptq,wanda")
    ap.add_argument("--cli", action="store_true", help="also run the CLI (block by block and whole model, no limit)")
    a = ap.parse_args()
    root = a.dir / (("quick" if a.quick else "full") + (f"-{a.blocks}" if a.blocks else ""))
    src, text = root / "model", root / "calib.txt"
    if not src.exists():  # made in a child: a child's peak RSS starts from its parent's at fork
        rc, _, wall, line = run_child(["--child", "make", str(src), str(int(a.quick)), str(a.blocks)])
        if rc != 0:
            sys.exit(f"making the model failed: {line}")
        print(f"made {src} in {wall:.0f} s")
    sentences(text, 32)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    _, _, _, line = run_child(["--child", "baseline"])
    base = json.loads(line)["vm"]
    print(f"model: {size / 1e9:.2f} GB of float32 safetensors; calibration: 32 sentences of 14 words (+2 special tokens)")
    print(f"virtual size of a child that imported torch, transformers and infercomp (VmPeak): {base / 2**30:.2f} GiB")
    print(f"reading every weight once needs at least {(base + size) / 2**30:.2f} GiB of address space")
    print()
    print(f"{'method':<8} {'run':<24} {'RLIMIT_AS':>9} {'exit':>5} {'peak RSS MiB':>13} {'VmPeak MiB':>11} {'wall s':>7}  note")

    def show(method: str, path: str, limit: int | None, args: list[str]) -> int:
        rc, peak, wall, line = run_child(args, limit=limit)
        vm = json.loads(line)["vm"] if rc == 0 and line.startswith("{") else 0
        cap = f"{limit / 2**30:.2f} GiB" if limit else "none"
        note = "ok" if rc == 0 else line[:80]
        vm_s = f"{vm / 2**20:.0f}" if vm else "-"
        print(f"{method:<8} {path:<24} {cap:>9} {rc:>5} {peak:>13.0f} {vm_s:>11} {wall:>7.1f}  {note}", flush=True)
        return vm

    for method in a.methods.split(","):

        def output(m: str, stream: bool, tag: str) -> Path:
            return root / f"{m}-{'streamed' if stream else 'memory'}-{tag}{'' if m.endswith('-dir') else '.safetensors'}"

        def api(stream: bool, tag: str, m: str = method) -> list[str]:
            out = output(m, stream, tag)
            shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
            return ["--child", "api", str(src), str(out), m, str(text), str(int(stream))]

        # Both runs without a limit (their outputs compared byte for byte); then the limit between
        # the streamed run's virtual peak and what reading the weights once needs, both again.
        streamed = "streamed, block by block" if method in ("gptq", "wanda") else "streamed, by tensor"
        vm_seq = show(method, streamed, None, api(True, "free"))
        show(method, "in memory", None, api(False, "free"))
        same = _contents(output(method, True, "free")) == _contents(output(method, False, "free"))
        print(f"  streamed output == in-memory output: {same}")
        if vm_seq and vm_seq < size:  # a limit below the model's own size that the streamed run fits under
            limit = int((vm_seq + size) / 2)
        elif vm_seq and vm_seq < base + size:
            limit = int((vm_seq + base + size) / 2)
        else:  # the fixed costs outweigh the weights (a small model): just above the streamed peak
            limit = int(vm_seq * 1.05) if vm_seq else int(base + 0.75 * size)
            print(f"  (the streamed virtual peak is not below reading the weights once at this size: limit {limit / 2**30:.2f} GiB)")
        print(
            f"  limit {limit / 2**30:.2f} GiB vs the model's {size / 2**30:.2f} GiB on disk: the model is {'larger' if size > limit else 'not larger'}"
        )
        show(method, "in memory", limit, api(False, "capped"))
        show(method, streamed, limit, api(True, "capped"))
        if a.cli:
            for seq in (True, False):
                out = root / f"{method}-cli-{int(seq)}"
                verb = ["quantize", str(src), "-o", str(out), "--scheme", "int4", "--method", "gptq", "--calib-samples", "32"]
                if method == "wanda":
                    verb = ["prune", str(src), "-o", str(out), "--method", "wanda", "--sparsity", "0.5"]
                cli = [*verb, "--data", str(text), "--no-latency", "--force", "--quiet"]
                show(method, f"cli, {'blocks' if seq else 'whole model'}", None, ["--child", "cli", str(int(seq)), *cli])


if __name__ == "__main__":
    main()
