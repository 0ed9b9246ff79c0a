"""``infercomp run RECIPE.yaml``: a chain of steps (prune -> distill -> quantize -> report), each
with its CLI options, run like make: a step whose inputs (by SHA-256), options and infercomp
version did not change since the last run is skipped.

    model: sample_models/digits_cnn.safetensors      # the recipe's input
    out: out/cnn_recipe                              # every step writes out/<name>.safetensors (out/<name>/ from a HF directory)
    steps:
      - name: channel50
        prune: {method: channel, sparsity: 0.5, data: sample_models/digits_test.safetensors}
      - name: small
        distill: {student: channel50, data: sample_models/digits_train.safetensors, epochs: 10}
      - name: int8
        quantize: {scheme: int8}
      - report: {checkpoints: [model, channel50, small, int8], data: sample_models/digits_test.safetensors,
                 fail_if: ["accuracy_drop>0.01"]}

A transform step reads the previous step's output (``input: NAME`` or ``input: model`` to choose);
distill's teacher is the recipe's model unless ``teacher:`` says otherwise, and its student is the
previous step's output, the one ``input:`` names, or ``student:`` (which may name a step). A step
name names its output: letters, digits, ``_``, ``-`` and ``.``. A step's fingerprint (inputs by
SHA-256, options and gates, paths as seen from the recipe's folder) decides whether it is up to date;
a step whose gate failed never is. Option names are the CLI flags (``group_size`` or ``group-size``). Each output's history
holds every step that led to it. A failing step stops the recipe naming the step; the outputs of
earlier steps stay as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import infercomp.api as api
import infercomp.checkpoint as checkpoint
from infercomp.errors import InfercompError, UsageError
from infercomp.gates import check_gates
from infercomp.measure import Comparison, MeasureOptions
from infercomp.progress import NULL, Progress
from infercomp.version import __version__

VERBS: dict[str, Callable[..., Any]] = {"prune": api.prune, "quantize": api.quantize, "distill": api.distill, "report": api.report}
# Options a recipe step may not set: the recipe decides them (or they make no sense in a chain).
_RESERVED = {"source", "output", "teacher", "paths", "progress", "force", "measure"}
STATE = ".infercomp-recipe.json"
MEASURE_OPTIONS = {f.name for f in dataclasses.fields(MeasureOptions)}


@dataclass
class Step:
    """One step: its verb, its options as written, and where it was written (for errors)."""

    name: str
    verb: str
    options: dict[str, Any]
    line: int
    input: str | None = None


@dataclass
class StepResult:
    name: str
    verb: str
    ran: bool
    output: Path | None
    comparison: Comparison | None = None


@dataclass
class Recipe:
    path: Path
    model: Path
    out: Path
    steps: list[Step] = field(default_factory=list)


def _lines(node: yaml.Node) -> Any:
    """A YAML node as Python values, mappings as ``{key: (value, line)}`` (lines 1-based)."""
    if isinstance(node, yaml.MappingNode):
        return {k.value: (_lines(v), k.start_mark.line + 1) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_lines(v) for v in node.value]
    return yaml.safe_load(yaml.serialize(node))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, (v, _) in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load(path: str | Path) -> Recipe:
    """Read and check a recipe; an unknown key or option is a UsageError naming its line."""
    p = Path(path)
    try:
        node = yaml.compose(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{p}: not a readable YAML recipe ({str(e).splitlines()[0]})") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{p}: not a YAML recipe (not UTF-8 text: byte {e.start})") from e
    doc = _lines(node) if node is not None else None
    if not isinstance(doc, dict):
        raise UsageError(f"{p}: a recipe is a mapping with 'model', 'out' and 'steps'")
    for key, (_, line) in doc.items():
        if key not in ("model", "out", "steps"):
            raise UsageError(f"{p}:{line}: unknown key {key!r}; a recipe has model, out and steps")
    if "model" not in doc or "steps" not in doc:
        raise UsageError(f"{p}: a recipe needs 'model' (the input checkpoint) and 'steps'")
    base = p.parent
    recipe = Recipe(path=p, model=_near(base, _plain(doc["model"][0])), out=_near(base, _plain(doc.get("out", ("out", 0))[0])))
    steps = doc["steps"][0]
    if not isinstance(steps, list) or not steps:
        raise UsageError(f"{p}:{doc['steps'][1]}: 'steps' must be a non-empty list")
    for i, raw in enumerate(steps, 1):
        recipe.steps.append(_step(p, i, raw))
    names = [s.name for s in recipe.steps]
    if len(set(names)) != len(names) or "model" in names:
        raise UsageError(f"{p}: step names must be unique and not 'model': {names}")
    return recipe


def _step(p: Path, i: int, raw: Any) -> Step:
    if not isinstance(raw, dict):
        raise UsageError(f"{p}: step {i} must be a mapping such as {{prune: {{...}}}}")
    verbs = [k for k in raw if k in VERBS]
    first_line = min(line for _, line in raw.values())
    for key, (_, line) in raw.items():
        if key not in VERBS and key not in ("name", "input"):
            raise UsageError(f"{p}:{line}: unknown key {key!r} in step {i}; a step has one of {', '.join(VERBS)}, and name, input")
    if len(verbs) != 1:
        raise UsageError(f"{p}:{first_line}: step {i} must have exactly one of {', '.join(VERBS)}")
    verb = verbs[0]
    opts_raw, _ = raw[verb]
    opts_raw = opts_raw or {}
    if not isinstance(opts_raw, dict):
        raise UsageError(f"{p}:{raw[verb][1]}: the options of {verb} must be a mapping")
    allowed = (set(inspect.signature(VERBS[verb]).parameters) - _RESERVED - {"measure_options"}) | MEASURE_OPTIONS
    allowed |= {"teacher"} if verb == "distill" else set()
    allowed |= {"checkpoints"} if verb == "report" else set()
    allowed |= {"fail_if"}
    options = {}
    for key, (value, line) in opts_raw.items():
        name = key.replace("-", "_")
        if name == "no_latency":  # the CLI flag --no-latency is the API's latency=False
            name, value = "latency", not _plain(value)
        if name not in allowed:
            known = ", ".join(sorted(allowed))
            raise UsageError(f"{p}:{line}: unknown option {key!r} for {verb}; known: {known}")
        options[name] = _plain(value)
    name = str(_plain(raw["name"][0])) if "name" in raw else f"{i}_{verb}"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):  # it names a file in `out`: no folders, no "../"
        raise UsageError(f"{p}:{raw['name'][1]}: step name {name!r}: use letters, digits, '_', '-' and '.' (it names the output file)")
    step_input = str(_plain(raw["input"][0])) if "input" in raw else None
    return Step(name=name, verb=verb, options=options, line=first_line, input=step_input)


def run(
    recipe: Recipe, *, progress: Progress = NULL, force: bool = False, on_step: Callable[[StepResult], None] | None = None
) -> list[StepResult]:
    """Run the steps in order, skipping those that are up to date (``force`` runs them all)."""
    recipe.out.mkdir(parents=True, exist_ok=True)
    state_path = recipe.out / STATE
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
    except ValueError:
        state = {}
    outputs: dict[str, Path] = {"model": recipe.model}
    previous = recipe.model
    results = []
    for i, step in enumerate(recipe.steps, 1):
        where = f"{recipe.path}: step {i} ({step.name}, {step.verb}, line {step.line})"
        try:
            result = _run_step(step, outputs, previous, recipe, state, force, progress)
        except InfercompError as e:
            raise type(e)(f"{where}: {e}") from e
        fingerprint = result.pop("fingerprint")
        res = StepResult(name=step.name, verb=step.verb, **result)
        results.append(res)
        if on_step is not None:
            on_step(res)
        failed: InfercompError | None = None
        if res.comparison is not None and step.options.get("fail_if"):
            try:
                check_gates(res.comparison, step.options["fail_if"])
            except InfercompError as e:
                failed = type(e)(f"{where}: {e}")
        if failed is None:
            state[step.name] = fingerprint
        else:  # a step whose gate failed is not up to date: the next run does it again (and fails again)
            state.pop(step.name, None)
        checkpoint.write_atomic(
            state_path, lambda f: f.write(json.dumps(state, indent=1, sort_keys=True).encode()), what="the recipe state"
        )
        if failed is not None:
            raise failed
        if res.output is not None:
            outputs[step.name] = res.output
            previous = res.output
    return results


def _resolve(value: Any, outputs: dict[str, Path], base: Path) -> Path:
    """A step name (or ``model``) becomes that step's output path; other paths are relative to the recipe."""
    if isinstance(value, str) and value in outputs:
        return outputs[value]
    return _near(base, value)


def _near(base: Path, value: Any) -> Path:
    """``value`` relative to the recipe's folder, normalised (``examples/../out`` -> ``out``)."""
    return Path(os.path.normpath(base / str(value)))


def _run_step(
    step: Step, outputs: dict[str, Path], previous: Path, recipe: Recipe, state: dict[str, Any], force: bool, progress: Progress
) -> dict[str, Any]:
    opts = dict(step.options)
    opts.pop("fail_if", None)
    base = recipe.path.parent
    for key in ("data", "eval_data", "val_data", "student"):
        if opts.get(key) is not None:
            opts[key] = _resolve(opts[key], outputs, base)
    verb = VERBS[step.verb]
    if step.verb == "report":
        names = opts.pop("checkpoints", [*outputs])
        paths = [_resolve(n, outputs, base) for n in names]
        return {"ran": True, "output": None, "comparison": verb(paths, progress=progress, **opts), "fingerprint": None}
    source = outputs[step.input] if step.input in outputs else previous
    if step.input is not None and step.input not in outputs:
        raise UsageError(f"input {step.input!r} names no earlier step (steps so far: {', '.join(outputs)})")
    if step.verb == "distill":
        teacher = opts.pop("teacher", "model")
        if step.input is not None and opts.get("student") is not None:
            raise UsageError("a distill step takes its student from 'input' or 'student', not both")
        student = source if step.input is not None else previous if previous != recipe.model else None
        source = _resolve(teacher, outputs, base)
        opts.setdefault("student", student)
    # A Hugging Face directory in gives one out (config.json, tokenizer), as the commands do.
    out = recipe.out / (step.name if source.is_dir() else f"{step.name}.safetensors")
    reads = [source, *(v for k, v in opts.items() if k in ("data", "eval_data", "val_data", "student") and v is not None)]
    home = recipe.path.resolve().parent  # paths as seen from the recipe: the same however its path was spelled

    def seen(v: Any) -> Any:
        return os.path.relpath(Path(v).resolve(), home) if isinstance(v, Path) else v

    fingerprint = {  # a new infercomp may transform differently (defaults, formats): its outputs are not cached ones
        "infercomp_version": __version__,
        "verb": step.verb,
        "options": json.dumps({k: seen(v) for k, v in opts.items()}, sort_keys=True, default=str),
        "gates": step.options.get("fail_if") or [],  # a changed gate must be checked: the step runs again
        "inputs": {seen(Path(r)): _sha(Path(r)) for r in reads},
    }
    if not force and out.exists() and state.get(step.name) == fingerprint:
        return {"ran": False, "output": out, "fingerprint": fingerprint}
    if state.pop(step.name, None) is not None:  # not up to date until it finishes: a run cut short must not leave it so
        checkpoint.write_atomic(
            recipe.out / STATE, lambda f: f.write(json.dumps(state, indent=1, sort_keys=True).encode()), what="the recipe state"
        )
    # A transform step measures only when it has gates of its own; the report step measures.
    comparison = verb(source, out, force=True, measure=bool(step.options.get("fail_if")), progress=progress, **opts)
    return {"ran": True, "output": out, "comparison": comparison, "fingerprint": fingerprint}


def _sha(p: Path) -> str:
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    return checkpoint.sha256(p) if p.suffix == ".safetensors" or p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
