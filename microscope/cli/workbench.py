"""`microscope demo`, `microscope run SPEC`, `microscope experiments list` and `microscope experiments steps`.

Heavy modules (torch, transformers, the studies) are imported inside the commands so that
`microscope --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from microscope.cli.invocation import command_line

experiments_app = typer.Typer(help="The experiment library: the shipped specs plus a team's folder of *.toml.",
                              no_args_is_help=True)
LIBRARY_HELP = ("The team's spec folder, searched before the shipped specs "
                "(default: $MICROSCOPE_EXPERIMENTS, else ./experiments).")


def _run_and_report(run) -> None:
    """Call `run()` (an experiment), print its headline numbers and where its files are."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    result = run()
    table = Table(title=f"{result.spec.name}: headline numbers ({result.seconds:.0f} s)")
    for column in ("step", "number", "value"):
        table.add_column(column)
    for step, numbers in result.headline.items():
        for key, value in numbers.items():
            if not isinstance(value, (dict, list)):
                table.add_row(step, key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    first = [k for k in ("report", "results", "store") if k in result.files]
    for label in first + [k for k in result.files if k not in first]:
        path = result.files[label]
        console.print(f"{label:>14}: {Path(path).resolve()}", highlight=False, soft_wrap=True)


def demo_command(
    out: str = typer.Option(None, help="Output folder (default: [outputs] dir of the demo spec)."),
) -> None:
    """The main job: dump the organism's activations, run the studies, write an HTML report + JSON."""
    from microscope.workbench.demo import run_demo

    _run_and_report(lambda: run_demo(out_dir=out, command=command_line()))


def run_command(
    spec: str = typer.Argument(..., help="A spec file (experiments/induction_heads.toml) or a spec's name "
                                         "(induction_heads)."),
    out: str = typer.Option(None, help="Output folder (default: the spec's [outputs] dir)."),
    directory: str = typer.Option(None, "--dir", help=LIBRARY_HELP),
    model: str = typer.Option(None, help="Run the spec on this model instead of its own: an HF folder, a hub "
                                         "id (facebook/opt-1.3b), organism or random:opt-125m. Results go "
                                         "to the spec's folder with the model's name appended."),
    param: list[str] = typer.Option(None, "--param", help="STEP.KEY=VALUE (a TOML value) over the spec's "
                                                          "[params.STEP], e.g. --param toxicity.seeds=[1,2]; "
                                                          "repeat the flag for more."),
) -> None:
    """Run one experiment spec; results carry provenance (commit, versions, seed, weights hash)."""
    from microscope.workbench.experiments import parse_param, run_experiment

    overrides: dict[str, dict] = {}
    for text in param or []:
        step, key, value = parse_param(text)
        overrides.setdefault(step, {})[key] = value
    _run_and_report(lambda: run_experiment(spec, out_dir=out, command=command_line(), library=directory,
                                           model=model, params=overrides))


@experiments_app.command("list")
def list_command(
    directory: str = typer.Option(None, "--dir", help=LIBRARY_HELP),
) -> None:
    """Show every experiment spec with its one-line purpose."""
    from rich.console import Console
    from rich.table import Table

    from microscope.workbench.experiments import list_specs

    specs = list_specs(directory)
    table = Table(title="experiments", caption="run one: microscope run NAME", box=None)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("purpose")
    table.add_column("model", no_wrap=True)
    for spec in specs:
        table.add_row(spec.name, spec.purpose, spec.model)
    Console().print(table)


@experiments_app.command("steps")
def steps_command() -> None:
    """Show every step a spec's 'analysis' can list, with what it is for and its function."""
    from rich.console import Console
    from rich.table import Table

    from microscope.analysis.registry import ANALYSES
    from microscope.workbench.experiments import DUMP, DUMP_FUNCTION, DUMP_PURPOSE

    table = Table(title="steps", caption="set a step's arguments in [params.STEP]", box=None)
    table.add_column("step", no_wrap=True, style="bold")
    table.add_column("purpose")
    table.add_column("function", no_wrap=True)
    table.add_row(DUMP, DUMP_PURPOSE, DUMP_FUNCTION)
    for analysis in ANALYSES.values():
        table.add_row(analysis.name, analysis.purpose, analysis.function)
    Console().print(table)
