"""The house stays a house: every module imports only from layers below (or beside) its own, the
transform families never import each other, the pipeline or the measurements, there is no import
cycle, and no function imports an infercomp module lazily (which is how cycles hide).

Read with ``ast`` (nothing is imported), deferred imports included. docs/design.md shows the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "infercomp"

# Bottom to top. A module may import modules of its own layer or of lower layers only.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "progress", "patterns", "version", "metrics", "timing", "kernels", "allocator"),
    ("formats", "compute"),
    ("checkpoint",),
    ("hf", "zoo"),
    ("data",),
    ("models",),
    ("transform", "blocks", "hessian"),
    ("prune", "quantize", "distill", "export"),
    ("measure",),
    ("gates", "sensitivity", "stream"),
    ("pipeline",),
    ("api",),
    ("recipe",),
    ("render", "plot"),
    ("commands",),
    ("cli", "memprobe", "__main__"),
]
FAMILIES = ("prune", "quantize", "distill", "export")
# The memory probe imports what it loads after it marks the memory in use (see its comment).
DEFERRED_ALLOWED = {"infercomp.memprobe"}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> tuple[set[str], list[int]]:
    """(infercomp modules imported anywhere in ``module``, line numbers of imports inside functions)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            if n.startswith("infercomp"):
                t = _resolve(n)
                if t and t != module:
                    targets.add(t)
    deferred = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(fn):
            mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name if isinstance(node, ast.Import) else None
            relative = isinstance(node, ast.ImportFrom) and node.level > 0
            if (mod or "").startswith("infercomp") or relative:
                deferred.append(node.lineno)
    return targets, deferred


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int | None:
    """Layer index of an ``infercomp.x[.y]`` module (None for the package root, which is the top)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_imports.py and to docs/design.md")


def test_every_module_has_a_layer() -> None:
    for m in MODULES:
        _layer(m)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for m, (targets, _) in GRAPH.items():
        lm = _layer(m)
        for t in targets:
            lt = _layer(t)
            if lm is not None and (lt is None or lt > lm):
                wrong.append(f"{m} (layer {lm}) imports {t} (layer {lt})")
    assert not wrong, "\n".join(wrong)


def test_transform_families_stay_apart() -> None:
    wrong = []
    for m, (targets, _) in GRAPH.items():
        family = m.split(".")[1] if m.count(".") >= 1 else None
        if family not in FAMILIES:
            continue
        for t in targets:
            other = t.split(".")[1] if t.count(".") >= 1 else None
            if other in FAMILIES and other != family:
                wrong.append(f"{m} imports {t}")
    assert not wrong, "\n".join(wrong)


def test_no_function_level_infercomp_imports() -> None:
    deferred = [f"{m}:{line}" for m, (_, lines) in GRAPH.items() if m not in DEFERRED_ALLOWED for line in lines]
    assert not deferred, "imports of infercomp modules inside functions (hidden cycles?): " + ", ".join(deferred)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), leaving out the usual
    re-export pair of a package and one of its own submodules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v][0]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            strong(v)
    return [c for c in out if not (len(c) == 2 and c[1].startswith(c[0] + "."))]


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_the_checks_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cycle, an upward import and a deferred import planted in the graph are all caught."""
    monkeypatch.setitem(GRAPH, "infercomp.formats", ({"infercomp.models"}, [12]))
    monkeypatch.setitem(GRAPH, "infercomp.models", (GRAPH["infercomp.models"][0] | {"infercomp.formats"}, []))
    assert any("infercomp.formats" in c for c in _cycles())
    with pytest.raises(AssertionError, match="infercomp.formats .layer 1. imports infercomp.models"):
        test_imports_point_down_the_layers()
    with pytest.raises(AssertionError, match="infercomp.formats:12"):
        test_no_function_level_infercomp_imports()
