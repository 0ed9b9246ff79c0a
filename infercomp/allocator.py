"""glibc's malloc settings, set for what the process does: run models, or stream tensors.

Running models (``for_models``): glibc gives memory at the top of its heap back to the system
once more than its trim threshold is free there (by default twice the largest mapped block it
has freed, starting at 128 KiB), and serves large blocks from mappings of their own, unmapped
when freed. An eager forward pass frees its activations in bursts, so every call gave its
activation memory back and faulted it in again, zero-filled, page by page: all-MiniLM-L6-v2 in
float32 at batch 32 x 16 tokens took about 6,000 page faults a forward, 12-15 % of its latency on
a 2-core Xeon (AMX / AVX-512), by hand. ``for_models`` raises the trim threshold to 256 MiB and
the mmap threshold to 64 MiB, so freed activations stay in the heap for the next call, as
jemalloc and tcmalloc (the allocators PyTorch's CPU tuning guide preloads) keep theirs. The
cost: freed memory stays mapped to the process (at least up to the trim threshold).

Streaming tensors (``for_streaming``): the opposite. Walking a 200 MB file of 8 MB tensors one
at a time left 185 MB resident under glibc's defaults (tensors below its grown mmap threshold
are carved out of a heap that only grows) and 50 MB with blocks over 1 MiB mapped, and unmapped
when freed, at once. Only for a process that times no model meanwhile: every large activation
is then a fresh mapping.

Each function sets its mode when the process is not in it already (a recipe may stream one step
and measure the next). Neither changes anything when the allocator is not glibc's, when the user
chose its settings (the threshold ``MALLOC_*_`` variables, ``glibc.malloc`` tunables, or another
allocator in ``LD_PRELOAD``), or when ``INFERCOMP_MALLOC=default``. ``state()`` says which
holds, for the report.
"""

from __future__ import annotations

import ctypes
import os
import platform

TRIM_THRESHOLD = 256 << 20  # models: free memory kept at the heap top (bytes) before glibc returns it
MMAP_THRESHOLD = 64 << 20  # models: blocks above this get a mapping of their own
MMAP_FALLBACK = 32 << 20  # the most older glibc versions accept for the mmap threshold
STREAM_MMAP_THRESHOLD = 1 << 20  # streaming: blocks above this are mapped, and unmapped when freed
STREAM_TRIM_THRESHOLD = 128 << 10  # streaming: glibc's own default, fixed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "tbbmalloc", "snmalloc", "hoard")
OPT_OUT = ("default", "off", "none", "0")  # INFERCOMP_MALLOC values that leave glibc as it is

_mode: str | None = None  # "models", "streaming", or None: not set yet
_state: str | None = None  # what the last call did


def _untouched() -> str | None:
    """Why the allocator is left as it is, or None when infercomp may set it."""
    if os.environ.get("INFERCOMP_MALLOC", "").strip().lower() in OPT_OUT:
        return f"left as it is (INFERCOMP_MALLOC={os.environ['INFERCOMP_MALLOC'].strip()})"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    chosen = [v for v in USER_SETTINGS if v in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"glibc, as set in the environment ({', '.join(chosen)})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the platform's default"
    return None


def for_models() -> str:
    """Keep freed activations in the heap between calls (see the module's docstring); returns
    ``state()``."""
    return _set("models")


def for_streaming() -> str:
    """Give freed blocks over 1 MiB back to the system at once (see the module's docstring);
    returns ``state()``."""
    return _set("streaming")


def _set(mode: str) -> str:
    global _mode, _state
    if _mode == mode:
        return state()
    why = _untouched()
    if why is not None:
        _mode, _state = mode, why
        return why
    try:
        libc = ctypes.CDLL(None)
        if mode == "models":
            trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            mmap_at = next((m for m in (MMAP_THRESHOLD, MMAP_FALLBACK) if libc.mallopt(_M_MMAP_THRESHOLD, m)), 0)
            ok = bool(trim and mmap_at)
            done = f"glibc, thresholds raised by infercomp (trim {TRIM_THRESHOLD >> 20} MiB, mmap {mmap_at >> 20} MiB)"
        else:
            ok = libc.mallopt(_M_TRIM_THRESHOLD, STREAM_TRIM_THRESHOLD) and libc.mallopt(_M_MMAP_THRESHOLD, STREAM_MMAP_THRESHOLD)
            libc.malloc_trim(0)  # what running models kept goes back now
            done = f"glibc, set by infercomp for streaming (mmap {STREAM_MMAP_THRESHOLD >> 20} MiB)"
    except (OSError, AttributeError):  # no mallopt in this process's C library
        _mode, _state = mode, "the platform's default"
        return _state
    _mode, _state = mode, done if ok else "glibc (mallopt refused infercomp's thresholds)"
    return _state


def state() -> str:
    """What the allocator is in this process: as infercomp last set it, or glibc's default."""
    return _state or _untouched() or "glibc's default"
