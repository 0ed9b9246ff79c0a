"""The command line: mounts the subcommands. Each lives in ``infercomp/commands/``."""

from __future__ import annotations

from typing import Annotated

import typer

from infercomp.commands.distill import distill
from infercomp.commands.export import export
from infercomp.commands.prune import prune
from infercomp.commands.quantize import quantize
from infercomp.commands.report import report
from infercomp.commands.run import run
from infercomp.version import __version__

app = typer.Typer(
    name="infercomp",
    help="Make saved PyTorch models cheaper to run: prune, quantize, distill, and report honest before/after numbers.\n\n"
    "Exit codes: 0 ok; 1 a --fail-if gate held; 2 usage or bad input; 3 internal error (a bug: rerun with --debug); 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command()(prune)
app.command()(quantize)
app.command()(distill)
app.command()(export)
app.command()(report)
app.command()(run)


def _version(value: bool) -> None:
    if value:
        print(f"infercomp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    del version


def main() -> None:
    """Console-script entry point."""
    app(prog_name="infercomp")
