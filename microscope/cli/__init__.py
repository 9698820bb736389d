"""The `microscope` command. Each command group lives in its own module; this file wires them up.

Errors: see `microscope.cli.errors` (one line on stderr for a user error, `--debug` for its traceback).
"""

from __future__ import annotations

import typer

from microscope.cli.errors import ErrorReportingGroup

app = typer.Typer(help="OPT Microscope: look inside OPT language models.", no_args_is_help=True,
                  cls=ErrorReportingGroup, pretty_exceptions_show_locals=False)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", envvar="MICROSCOPE_DEBUG",
                                    help="Show the traceback of user errors too.")) -> None:
    """OPT Microscope: look inside OPT language models."""  # `debug` is read by ErrorReportingGroup


# --- command registrations (one line per command; keep sorted by area) ---
from microscope.cli.organism import organism_app  # noqa: E402

app.add_typer(organism_app, name="organism")
from microscope.cli.plan import convert_metaseq_command, plan_command  # noqa: E402

app.command("plan")(plan_command)
app.command("convert-metaseq")(convert_metaseq_command)
from microscope.cli.dump import dump_command, inspect_command  # noqa: E402

app.command("dump")(dump_command)
app.command("inspect")(inspect_command)
from microscope.cli.workbench import demo_command, experiments_app, run_command  # noqa: E402

app.command("demo")(demo_command)
app.command("run")(run_command)
app.add_typer(experiments_app, name="experiments")
from microscope.cli.features import features_app  # noqa: E402

app.add_typer(features_app, name="features")
from microscope.cli.graph import graph_app  # noqa: E402

app.add_typer(graph_app, name="graph")
