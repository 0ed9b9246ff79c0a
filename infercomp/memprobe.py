"""Peak resident memory of loading one checkpoint and running one forward pass, measured in a
fresh process (``python -m infercomp.memprobe``) so models do not share one process's peak.

Prints one JSON line: ``{"peak_memory_bytes": N}`` = peak RSS during load + forward minus the RSS
after imports (torch itself is not counted; on Linux the peak mark is reset after imports)."""

from __future__ import annotations

import argparse
import json
import resource
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs), so the peak reached while
    importing torch does not hide what loading the model adds."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def _current_bytes() -> int:
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else _peak_bytes()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--spec", required=True, help="model reference JSON {ref, config}")
    ap.add_argument("--input-shape", required=True, help="JSON list: shape of one batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compute", default="fp32")
    args = ap.parse_args(argv)

    # Imported here, after the arguments are read, on purpose: the probe measures what loading
    # adds on top of the imports, so it marks the memory in use once they are done.
    import torch

    import infercomp.checkpoint as checkpoint
    from infercomp.models import ModelLoader

    spec = json.loads(args.spec)
    shape = json.loads(args.input_shape)
    _reset_peak()
    start = _current_bytes()
    # The parent already enforced the trust rules before asking for this measurement.
    loader = ModelLoader(ref=spec["ref"], config=spec["config"])
    x = torch.rand(shape, device=args.device)
    module, _ = loader.build_for_inference(checkpoint.load(args.path), compute=args.compute, device=torch.device(args.device), example=x)
    with torch.inference_mode():
        module(x)
    print(json.dumps({"peak_memory_bytes": max(0, _peak_bytes() - start)}))


if __name__ == "__main__":
    main()
