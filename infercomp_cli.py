"""The ``infercomp`` console script's entry point.

It lives outside the ``infercomp`` package on purpose: importing the package imports torch, which
takes a second or two, and a Ctrl-C or SIGTERM in that time would otherwise end in Python's
traceback. This module installs the handlers first, then imports the command line, so an
interrupt at any moment exits 130 with one line (and nothing written: no work has started).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

INTERRUPTED = 130


def _interrupt(signum: int, frame: Any) -> None:
    del signum, frame
    raise KeyboardInterrupt


def main() -> None:
    """Run the infercomp command line."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from infercomp.cli import main as run  # imported after the handlers, see above
    except KeyboardInterrupt:
        print("infercomp: interrupted while starting; nothing was written", file=sys.stderr, flush=True)
        # Out at once, without the interpreter's shutdown: torch interrupted halfway through its
        # import can leave native threads that abort the process at shutdown (exit 134, "terminate
        # called without an active exception", seen 2 times in 30). Nothing was written to clean up.
        os._exit(INTERRUPTED)
    run()


if __name__ == "__main__":
    main()
