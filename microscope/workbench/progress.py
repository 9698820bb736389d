"""Progress of long work (experiments, the demo) as a rich progress bar.

rich draws in a terminal and, inside JupyterLab, as a live notebook output (it detects the
kernel and renders through an ipywidgets output area), so one bar serves both.

    with step_progress("demo", total=5) as bar:
        bar.start("dump"); ...; bar.sub({"tokens": 10, "total": 100}); ...; bar.advance()
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StepProgress:
    """One bar over an experiment's steps, plus one for the current step's own units
    (tokens of a dump) when the step reports them through `sub`."""

    def __init__(self, name: str, total: int, enabled: bool = True, console: Console | None = None):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                 console=console or Console(stderr=True), disable=not enabled)
        self.name = name
        self.steps = self.progress.add_task(name, total=total, unit="steps")
        self.units = None

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, step: str) -> None:
        """Show that `step` is running."""
        self.progress.update(self.steps, description=f"{self.name}: {step}")

    def sub(self, state: dict) -> None:
        """Units done within the step: {"tokens": done, "total": all} (the dump's callback)."""
        if self.units is None:
            self.units = self.progress.add_task("  tokens", total=state["total"], unit="tokens")
        self.progress.update(self.units, completed=state["tokens"], total=state["total"])

    def advance(self) -> None:
        """The current step is done."""
        if self.units is not None:
            self.progress.remove_task(self.units)
            self.units = None
        self.progress.advance(self.steps)


def step_progress(name: str, total: int, enabled: bool = True) -> StepProgress:
    """A `StepProgress` (use it as a context manager)."""
    return StepProgress(name, total, enabled=enabled)
