"""The allocator settings for running models (infercomp.allocator): freed activations stay in the
heap between calls, unless the user chose the allocator's settings."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import infercomp.allocator as allocator
from infercomp.kernels import KernelCache
from tests.conftest import DIGITS_TEST, SAMPLE, run_cli

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A large activation (40 MB, a (B, T, vocab) logits tensor, say) made, written and freed: above
# glibc's largest own mmap threshold (32 MB) it gets a mapping of its own, given back at the
# free, so each call faults its 10,240 pages in again. Tuned (threshold 64 MB), it comes from the
# heap, which keeps it. Huge pages are turned off for the process: a fault is one 4 KB page.
_FAULTS = """
import ctypes, json, resource, sys, torch
import infercomp.allocator as allocator
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
torch.set_num_threads(1)
if sys.argv[1] == "tune":
    allocator.tune()
def burst():
    x = torch.empty(10 << 20).fill_(1.0)
    del x
for _ in range(4):
    burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    burst()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "state": allocator.state()}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "INFERCOMP_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_tuned_heap_keeps_freed_activations():
    plain, tuned = _run("plain"), _run("tune")
    assert plain["state"] == "glibc's default"
    assert tuned["state"].startswith("glibc, thresholds raised by infercomp")
    assert plain["faults"] >= 8 * 10240  # glibc's defaults give the 40 MB back at each free
    assert tuned["faults"] < 10240


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_user_settings_are_left_alone():
    opted_out = _run("tune", INFERCOMP_MALLOC="default")
    assert opted_out["state"] == "left as it is (INFERCOMP_MALLOC=default)"
    assert opted_out["faults"] >= 8 * 10240
    own = _run("tune", MALLOC_TRIM_THRESHOLD_="1000000000")
    assert own["state"] == "glibc, as set in the environment (MALLOC_TRIM_THRESHOLD_)"


def test_other_allocator_in_ld_preload_is_named(monkeypatch):
    monkeypatch.delenv("INFERCOMP_MALLOC", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator._untouched() == "jemalloc (LD_PRELOAD)"


def test_kernel_choices_are_cached_per_allocator(monkeypatch):
    monkeypatch.setattr(allocator, "_state", "glibc's default")
    before = KernelCache.context()
    monkeypatch.setattr(allocator, "_state", "jemalloc (LD_PRELOAD)")
    assert KernelCache.context() != before
    assert KernelCache.context().endswith("|jemalloc (LD_PRELOAD)")


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
@pytest.mark.parametrize(
    ("env", "expected"), [({}, "glibc, thresholds raised by infercomp"), ({"INFERCOMP_MALLOC": "default"}, "left as it is")]
)
def test_report_says_which_allocator_ran_the_models(env: dict[str, str], expected: str):
    r = run_cli("report", str(SAMPLE["mlp"]), "--data", str(DIGITS_TEST), "--no-latency", "-f", "json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["allocator"].startswith(expected)
