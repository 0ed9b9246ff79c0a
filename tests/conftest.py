"""Shared fixtures: sample model paths, tiny checkpoints named for their edge case, CLI helpers.

Every test writes under ``tmp_path``; ``_no_litter`` fails a test that leaves files in the
working directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from infercomp import checkpoint
from infercomp.checkpoint import Checkpoint
from infercomp.cli import app
from infercomp.progress import Progress, Task

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DIGITS_TEST = SAMPLES / "digits_test.safetensors"
DIGITS_TRAIN = SAMPLES / "digits_train.safetensors"
SAMPLE = {name: SAMPLES / f"digits_{name}.safetensors" for name in ("mlp", "cnn", "transformer")}
# Test accuracies the committed sample checkpoints reach (sample_models/train.py prints them).
KNOWN_ACCURACY = {"mlp": 0.9889, "cnn": 0.9972, "transformer": 0.9694}


@pytest.fixture(autouse=True, scope="session")
def _own_kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The compute modes' choices are cached per machine (``~/.cache/infercomp``): the suite
    keeps its own, so it neither reads a user's cache nor writes one (subprocesses inherit it)."""
    old = os.environ.get("INFERCOMP_CACHE_DIR")
    os.environ["INFERCOMP_CACHE_DIR"] = str(tmp_path_factory.mktemp("infercomp-cache"))
    yield
    if old is None:
        os.environ.pop("INFERCOMP_CACHE_DIR", None)
    else:
        os.environ["INFERCOMP_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _no_litter():
    before = set(os.listdir(ROOT))
    yield
    after = set(os.listdir(ROOT)) - before
    assert not after, f"test left files in the repository root: {sorted(after)}"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    """Run the CLI in-process; stdout and stderr are kept apart."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *needles: str) -> None:
    """A CLI error as users see it: exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("infercomp: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m infercomp`` as a real subprocess."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "infercomp", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300
    )


class TinyMLP(nn.Module):
    """4 -> 8 -> 3: the smallest model with two Linear layers."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, hidden), nn.Linear(hidden, 3)
        self.example_input_shape = (4,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_mlp(hidden: int = 8) -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(hidden)


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    """A TinyMLP checkpoint whose model reference (tests.conftest:tiny_mlp) is *not* built in."""
    m = tiny_mlp()
    path = tmp_path / "tiny.safetensors"
    checkpoint.save(Checkpoint(tensors=dict(m.state_dict()), model={"ref": "tests.conftest:tiny_mlp", "config": {}}), path)
    return path


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=g)
    path = tmp_path / "tiny_data.safetensors"
    save_file({"inputs": x, "labels": tiny_mlp()(x).argmax(1)}, str(path))
    return path


def outlier_columns(seed: int, rows: int = 64, cols: int = 256) -> torch.Tensor:
    """Gaussian weights with a few input columns 20x larger (as in transformer FFN projections)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:, torch.randperm(cols, generator=g)[:4]] *= 20
    return w


class StopAt(Progress):
    """Sends this process SIGINT (as Ctrl-C would) after ``stop`` distillation steps."""

    def __init__(self, stop: int):
        self.stop, self.steps = stop, 0

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        outer = self

        class T(Task):
            def advance(self, n: float = 1, **fields) -> None:
                if description == "distilling" and fields:
                    outer.steps += int(n)
                    if outer.steps == outer.stop:
                        os.kill(os.getpid(), signal.SIGINT)

        yield T()
