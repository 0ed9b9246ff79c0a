"""Run every benchmark in turn (``make bench``). Each prints its own table of ratios measured side
by side in one run, with the issue's targets marked PASS or MISS."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Explicit list: adding a benchmark is adding its module here.
BENCHES = ("bench_kernels", "bench_runtime", "bench_quantize", "bench_prune", "bench_distill")


def main(names: list[str]) -> None:
    for name in names or BENCHES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            print(f"== {name}: not present, skipped")
            continue
        print(f"== {name}")
        t0 = time.perf_counter()
        mod.main()
        print(f"== {name}: {time.perf_counter() - t0:.0f} s\n")


if __name__ == "__main__":
    main(sys.argv[1:])
