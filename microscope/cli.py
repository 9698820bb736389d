"""The `microscope` command. Each area defines its commands in its own module; this file wires them up."""

from __future__ import annotations

import typer

app = typer.Typer(help="OPT Microscope: look inside OPT language models.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)

# --- command registrations (one line per command; keep sorted by area) ---
