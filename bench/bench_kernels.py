"""Linear kernels side by side on this CPU: float32 / bf16 ``F.linear`` and the int8 kernels of
``infercomp.kernels`` (per-row activation scales), as ratios of float32 measured in one run, with
the int8 path's time split into quantizing the activations, the GEMM and the rescale.

    .venv/bin/python bench/bench_kernels.py [--quick]

The same table runs again with oneDNN capped at AVX512_CORE_VNNI (no AMX, no bf16) and at AVX2
(no VNNI), in subprocesses (the cap must be set before torch loads oneDNN): what a CPU without
those units would do. This is the evidence behind which modes ``--compute auto`` tries.
"""

# ruff: noqa: B023  (each shape's lambdas run within that loop iteration, so late binding is safe)
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = [(4096, 384, 1536), (4096, 1536, 384), (512, 384, 1536), (16, 4096, 4096), (1, 4096, 4096)]
CAPS = ("AVX512_CORE_VNNI", "AVX2")


def table(quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    import infercomp.kernels as K
    from infercomp.timing import summarise, time_interleaved

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cap = K.isa_limit() or "unset"
    print(f"\nONEDNN_MAX_CPU_ISA={cap}; CPU features: {', '.join(K.cpu_features())}; torch {torch.__version__}, 2 threads")
    print(
        f"{'M x K -> N':>20} {'fp32 ms':>8} {'bf16':>6} {'int8 f32-in':>11} {'int8 bf16-in':>12} {'_int_mm':>8}   int8 split: quantize / GEMM / rescale (ms)"
    )
    for m, k, n in SHAPES:
        x = torch.randn(m, k) * torch.exp(torch.randn(m, 1) * 0.7)  # rows of different magnitudes, like tokens
        w = torch.randn(n, k) * 0.02
        b = torch.randn(n)
        wq = K.Int8Weight.from_float(w, b)
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        fns = {
            "fp32": lambda: F.linear(x, w, b),
            "bf16": lambda: F.linear(xb, wb, bb),
            "int8": lambda: K.linear_int8_onednn(x, wq),
            "int8b": lambda: K.linear_int8_onednn(xb, wq),
            "intmm": lambda: K.linear_int8_intmm(x, wq),
        }
        if cap != "unset" and not K.onednn_bf16_ok():
            fns.pop("bf16")  # seconds per call where oneDNN has no bf16 kernel: not worth timing
            fns.pop("int8b")
        xq, xs = K.quantize_rows(x, unsigned=True)
        parts = {
            "quantize": lambda: K.quantize_rows(x, unsigned=True),
            "gemm": lambda: torch.ops.onednn.qlinear_pointwise(
                xq, 1.0, 128, wq.packed(m), wq.scale, wq._zp, None, 1.0, 0, torch.float32, "none", [], ""
            ),
        }
        y = parts["gemm"]()
        parts["rescale"] = lambda: torch.addcmul(wq.bias, y, xs)
        budget = 0.2 if quick else 1.0
        names = [*fns, *parts]
        times = time_interleaved([*fns.values(), *parts.values()], device=torch.device("cpu"), warmup=2, min_time=budget, min_runs=5)
        ms = {name: summarise(t)["median"] for name, t in zip(names, times)}
        ratio = {name: f"{ms[name] / ms['fp32']:.2f}" if name in ms else "-" for name in ("bf16", "int8", "int8b", "intmm")}
        split = f"{ms['quantize']:.2f} / {ms['gemm']:.2f} / {ms['rescale']:.2f}"
        print(
            f"{f'{m} x {k} -> {n}':>20} {ms['fp32']:8.2f} {ratio['bf16']:>6} {ratio['int8']:>11} {ratio['int8b']:>12} {ratio['intmm']:>8}   {split}"
        )


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    quick = "--quick" in args
    table(quick)
    if "--no-caps" in args or os.environ.get("ONEDNN_MAX_CPU_ISA"):
        return
    for cap in CAPS:
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
        cmd = [sys.executable, __file__, "--no-caps", *(["--quick"] if quick else [])]
        subprocess.run(cmd, env=env, check=False, timeout=1200)


if __name__ == "__main__":
    main()
