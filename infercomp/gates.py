"""``--fail-if`` gates: conditions on a comparison that make a CI step fail (exit 1)."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence

from infercomp.errors import GateFailed, UsageError
from infercomp.measure import Comparison, ModelReport

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
_GATE = re.compile(r"^\s*([a-z_0-9.]+)\s*(<=|>=|<|>|==)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")
GATE_KEYS = (
    "accuracy",
    "accuracy_drop",
    "sparsity",
    "bits_per_weight",
    "size_ratio",
    "parameters_ratio",
    "latency_ratio",
    "top1_agreement",
    "cosine_mean",
    "cosine_min",
    "perplexity",
    "perplexity_ratio",
)


def parse_gate(text: str) -> tuple[str, str, float]:
    """``--fail-if 'accuracy_drop>0.01'`` -> (key, op, value)."""
    m = _GATE.match(text)
    try:
        if m and m.group(1) in GATE_KEYS:
            return m.group(1), m.group(2), float(m.group(3))
    except ValueError:  # '1.2.3' passes the pattern but is no number
        pass
    raise UsageError(f"--fail-if {text!r}: expected KEY OP NUMBER with KEY one of {', '.join(GATE_KEYS)} and OP one of <, <=, >, >=, ==")


def _gate_value(r: ModelReport, key: str) -> float | None:
    if key.endswith("_ratio"):
        return r.ratios.get(key.removesuffix("_ratio"))
    if key in ("top1_agreement", "cosine_mean", "cosine_min"):
        return None if r.fidelity is None else r.fidelity[key]
    return getattr(r, key)


def check_gates(comparison: Comparison, gates: Sequence[str]) -> None:
    """Raise GateFailed (exit 1) naming every gate that held true for a non-baseline model (the
    one model of a single-model report: its ratios and drops are against itself). A gate on a
    figure that was not measured, or is NaN / infinite, fails too: a CI gate must not pass
    silently."""
    failures = []
    checked = comparison.models[1:] or comparison.models[:1]
    for text in gates:
        key, op, value = parse_gate(text)
        for r in checked:
            got = _gate_value(r, key)
            if got is None:
                failures.append(f"{r.path}: {key} was not measured (gate {text!r})")
            elif not math.isfinite(got):
                failures.append(f"{r.path}: {key} is {got} (gate {text!r}: a non-finite figure never passes)")
            elif _OPS[op](got, value):
                failures.append(f"{r.path}: {key} = {got:.4g} ({text})")
    if failures:
        raise GateFailed("gate failed: " + "; ".join(failures))
