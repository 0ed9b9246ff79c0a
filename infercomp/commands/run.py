"""``infercomp run RECIPE.yaml``: a chain of steps, each skipped when up to date."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

import infercomp.commands.common as c
import infercomp.recipe as recipes
import infercomp.render as render


@c.handle_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (YAML): model, out, steps.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Run every step, even those that are up to date.")] = False,
    fmt: c.Format = "table",
    columns: c.Columns = None,
    quiet: c.Quiet = False,
    debug: c.Debug = False,
) -> None:
    """Run a recipe: prune -> distill -> quantize -> report steps, each with its CLI options.

    Each step writes OUT/NAME.safetensors (OUT/NAME from a Hugging Face directory). A step whose
    inputs (by SHA-256) and options have not changed since the last run is skipped, like make; a
    failing step or gate stops the recipe,
    naming the step, and leaves the earlier outputs as they are. See infercomp/recipe.py for the
    format and examples/compress_cnn.yaml for an example.
    """
    opts = c.Common.pick(locals())
    r = recipes.load(recipe)

    def report(step: recipes.StepResult) -> None:
        what = "ran" if step.ran else "up to date, skipped"
        print(f"infercomp: step {step.name} ({step.verb}): {what}" + (f" -> {step.output}" if step.output else ""), file=sys.stderr)
        if step.comparison is None:
            return
        if opts.fmt == "json":  # one report per measured step, one a line (JSON Lines), each naming its step
            doc = json.loads(render.to_json(step.comparison))
            doc["step"] = step.name
            print(json.dumps(doc, allow_nan=False), flush=True)
        else:  # report steps, and transform steps measured for their gates
            c.emit(step.comparison, opts)

    with opts.progress() as progress:
        recipes.run(r, progress=progress, force=force, on_step=report)
