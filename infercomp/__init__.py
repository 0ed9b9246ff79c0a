"""infercomp: make saved PyTorch models cheaper to run — prune, quantize, distill, report.

The Python API mirrors the command line: ``infercomp.prune``, ``infercomp.quantize``,
``infercomp.distill``, ``infercomp.export``, ``infercomp.report`` and ``infercomp.load`` (see ``infercomp.api``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

INTERRUPTED = 130


@contextlib.contextmanager
def _quiet_start_up() -> Iterator[None]:
    """Under ``python -m infercomp`` (and only then), a Ctrl-C or SIGTERM while the imports below
    run (torch: a second or two) ends in one line and exit 130, as the console script does
    (``infercomp_cli.py``), instead of Python's traceback. Nothing has been written yet. The
    commands install their own handlers once they start."""
    argv = list(getattr(sys, "orig_argv", []))
    launched = sys.argv[:1] == ["-m"] and "-m" in argv and argv[argv.index("-m") + 1 :][:1] in (["infercomp"], ["infercomp.__main__"])
    if not launched:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        del signum, frame
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        print("infercomp: interrupted while starting; nothing was written", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


with _quiet_start_up():
    from infercomp.api import distill, export, load, prune, quantize, report
    from infercomp.measure import Comparison, MeasureOptions, ModelReport
    from infercomp.version import __version__

__all__ = ["Comparison", "MeasureOptions", "ModelReport", "__version__", "distill", "export", "load", "prune", "quantize", "report"]
