"""The C allocator's settings for running models on the CPU.

glibc's malloc gives memory at the top of its heap back to the system once more than its trim
threshold is free there (by default twice the largest block it has served from the heap, a few
MB). An eager forward pass frees its activations in a burst at the end of every layer, so every
call gave its activation memory back and took it again, zero-filled page by page:
all-MiniLM-L6-v2 in float32 at batch 32 x 16 tokens took about 6,000 page faults (23 MB) a
forward, which was 12-15 % of its latency on a 2-core Xeon (AMX / AVX-512), measured by hand.

``tune()`` raises the trim and mmap thresholds once per process through glibc's ``mallopt``,
so freed activations stay in the heap for the next call, as jemalloc and tcmalloc (the
allocators PyTorch's CPU tuning guide recommends, through ``LD_PRELOAD``) keep theirs. It
changes nothing when the allocator is not glibc's, when the user chose allocator settings
(``MALLOC_*_`` / ``GLIBC_TUNABLES``, or another allocator in ``LD_PRELOAD``), or when
``INFERCOMP_MALLOC=default``. The cost: up to ``TRIM_THRESHOLD`` of freed memory stays mapped
to the process. ``state()`` says which of these holds, for the report.
"""

from __future__ import annotations

import ctypes
import os
import platform

TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap top (bytes) before glibc returns it
MMAP_THRESHOLD = 64 << 20  # blocks above this still get their own mapping, returned when freed
MMAP_FALLBACK = 32 << 20  # the most older glibc versions accept for the mmap threshold
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: str | None = None  # what tune() did, once per process


def _untouched() -> str | None:
    """Why the allocator is left as it is, or None when tune() may set it."""
    if os.environ.get("INFERCOMP_MALLOC", "").strip().lower() == "default":
        return "left as it is (INFERCOMP_MALLOC=default)"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    chosen = [v for v in _USER_SETTINGS if v in os.environ]
    if chosen:
        return f"glibc, as set in the environment ({', '.join(chosen)})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the platform's default"
    return None


def tune() -> str:
    """Raise glibc's trim and mmap thresholds once per process (see the module's docstring) and
    say what the allocator now is; where it may not be changed, change nothing and say why."""
    global _state
    if _state is not None:
        return _state
    why = _untouched()
    if why is not None:
        _state = why
        return _state
    try:
        libc = ctypes.CDLL(None)
        trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        mmap_at = MMAP_THRESHOLD
        mmap = libc.mallopt(_M_MMAP_THRESHOLD, mmap_at)
        if not mmap:
            mmap_at = MMAP_FALLBACK
            mmap = libc.mallopt(_M_MMAP_THRESHOLD, mmap_at)
    except (OSError, AttributeError):  # no mallopt in this process's C library
        _state = "the platform's default"
        return _state
    if trim and mmap:
        _state = f"glibc, thresholds raised by infercomp (trim {TRIM_THRESHOLD >> 20} MiB, mmap {mmap_at >> 20} MiB)"
    else:
        _state = "glibc's default (mallopt refused the thresholds)"
    return _state


def state() -> str:
    """What the allocator is in this process: as ``tune()`` left it, or glibc's default when no
    model has been run yet."""
    return _state or _untouched() or "glibc's default"
