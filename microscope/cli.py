"""The `microscope` command. Each area defines its commands in its own module; this file wires them up."""

from __future__ import annotations

import typer

app = typer.Typer(help="OPT Microscope: look inside OPT language models.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)

# --- command registrations (one line per command; keep sorted by area) ---
from microscope.models.organism.commands import organism_app  # noqa: E402

app.add_typer(organism_app, name="organism")
from microscope.scale_cli import convert_metaseq_command, plan_command  # noqa: E402

app.command("plan")(plan_command)
app.command("convert-metaseq")(convert_metaseq_command)
from microscope.activations.commands import dump_command, inspect_command  # noqa: E402

app.command("dump")(dump_command)
app.command("inspect")(inspect_command)
from microscope.workbench_cli import demo_command, experiments_app, run_command  # noqa: E402

app.command("demo")(demo_command)
app.command("run")(run_command)
app.add_typer(experiments_app, name="experiments")
