"""infercomp: make saved PyTorch models cheaper to run — prune, quantize, distill, report.

The Python API mirrors the command line: ``infercomp.prune``, ``infercomp.quantize``,
``infercomp.distill``, ``infercomp.export``, ``infercomp.report`` and ``infercomp.load`` (see ``infercomp.api``).
"""

from __future__ import annotations

from infercomp.api import distill, export, load, prune, quantize, report
from infercomp.measure import Comparison, MeasureOptions, ModelReport
from infercomp.version import __version__

__all__ = ["Comparison", "MeasureOptions", "ModelReport", "__version__", "distill", "export", "load", "prune", "quantize", "report"]
