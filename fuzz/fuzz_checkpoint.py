"""Coverage-guided fuzz target (atheris) for the checkpoint reader and the metadata parser.

    make fuzz                                   # installs atheris, runs for FUZZ_SECONDS (60)
    .venv/bin/python fuzz/fuzz_checkpoint.py fuzz/corpus -max_total_time=60

Each input is written to a file and read as a checkpoint; its encoded tensors are decoded and
its static statistics taken, as ``infercomp report`` does without a model. An InfercompError is
the expected answer to a bad file; any other exception is a finding (atheris stops and saves the
input as ``crash-*``). The seed corpus holds small valid checkpoints (int4, int8 with column
scales, 2:4 sparse) written by ``fuzz/make_corpus.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import infercomp.checkpoint as checkpoint
    import infercomp.formats as formats
    from infercomp.errors import InfercompError
    from infercomp.measure import static_stats

_DIR = Path(tempfile.mkdtemp(prefix="infercomp-fuzz-"))
_PATH = _DIR / "input.safetensors"


def test_one_input(data: bytes) -> None:
    _PATH.write_bytes(data)
    try:
        ckpt = checkpoint.load(_PATH)
        formats.logical_tensors(ckpt.tensors, ckpt.encodings, ckpt.name)
        static_stats(ckpt)
    except InfercompError:
        pass


def main() -> None:
    os.environ.setdefault("INFERCOMP_CACHE_DIR", str(_DIR / "cache"))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
