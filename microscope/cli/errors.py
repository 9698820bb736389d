"""The command line's one way of reporting an error.

A `MicroscopeError` (a user error: a missing model, a bad option, a malformed spec) raised by any
command becomes one line `error: ...` on stderr and exit status 1, with no traceback; any other
exception is a bug and keeps its traceback. The global `--debug` option (or `MICROSCOPE_DEBUG=1`)
shows the traceback of user errors too. Commands only raise; they never print errors themselves.
"""

from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

from microscope.errors import MicroscopeError


class OptionError(MicroscopeError, ValueError):
    """A command-line option with a value the command cannot use (names the option and the fix)."""


class ErrorReportingGroup(TyperGroup):
    """The top-level command group: turns a `MicroscopeError` from any subcommand into a clear exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MicroscopeError as err:
            if ctx.params.get("debug"):
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
