"""The command line: mounts the subcommands. Each lives in ``infercomp/commands/``."""

from __future__ import annotations

import sys
from typing import Annotated, Any

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


def _click_exceptions() -> Any:
    """The click exceptions typer raises: its vendored copy (typer >= 0.20), else click's own."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    """Console-script entry point. Usage errors (an unknown option, a value of the wrong type, a
    missing argument) are one line like every other error, instead of click's usage block."""
    ex = _click_exceptions()
    try:
        code = app(prog_name="infercomp", standalone_mode=False)
    except ex.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `infercomp`: the help, as before
            e.show()
            sys.exit(e.exit_code)
        where = e.ctx.command_path if e.ctx is not None else "infercomp"
        print(f"infercomp: error: {e.format_message()} (see '{where} --help')", file=sys.stderr)
        sys.exit(e.exit_code)
    except ex.ClickException as e:
        print(f"infercomp: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except ex.Abort:
        print("infercomp: interrupted; no partial output was left behind", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
