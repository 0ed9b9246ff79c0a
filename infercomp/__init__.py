"""infercomp: make saved PyTorch models cheaper to run — prune, quantize, distill, report."""

from __future__ import annotations

__version__ = "0.1.0"

from infercomp.api import compare_files, load  # noqa: E402

__all__ = ["__version__", "compare_files", "load"]
