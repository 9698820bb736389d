"""The one drawing of progress: an experiment's steps and the reports of the step running
(``progress(step, done, total)``, `microscope.analysis.progress`), for the workbench and the CLI.

Where stderr is a terminal, or inside JupyterLab (rich renders there as a live notebook output),
it is a live rich bar: one over the experiment's steps, one for the current step's own work.
Anywhere else -- a batch job, a SLURM log -- it prints plain lines instead, one per report, and
while one piece of work goes on at most one per `LINE_INTERVAL` seconds::

    [demo] toxicity (step 3 of 7)
    [toxicity] random-init controls: probes, patching 3/5 (12 s)

    with step_progress("demo", total=5) as bar:
        bar.start("dump"); ...; bar("tokens", 10, 100); ...; bar.advance()
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

LINE_INTERVAL = 10.0   # seconds between plain lines while one piece of work goes on


class StepProgress:
    """Progress of `total` steps named `name` (0: one piece of work, no steps). Call it as the
    `Progress` callback of the step running; `start` and `advance` mark the steps."""

    def __init__(self, name: str, total: int = 0, *, enabled: bool = True, stream: TextIO | None = None,
                 interval: float = LINE_INTERVAL):
        console = Console(file=stream or sys.stderr)
        self.name, self.total, self.enabled, self.interval = name, total, enabled, interval
        self.live = console.is_terminal or console.is_jupyter
        self.stream = console.file
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console, disable=not (enabled and self.live))
        self.steps = self.progress.add_task(name, total=total, unit="steps") if total else None
        self.step, self.done = name, 0
        self.work = None                   # the live task of the step's own work
        self.started = time.perf_counter()
        self.last_line, self.working = -float("inf"), False

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, step: str) -> None:
        """Show that `step` is running."""
        self.step = step
        if self.steps is not None:
            self.progress.update(self.steps, description=f"{self.name}: {step}")
        self._line(f"[{self.name}] {step} (step {self.done + 1} of {self.total})")

    def __call__(self, step: str, done: int, total: int) -> None:
        """A report of the step running: `done` of the `total` units of `step` are finished."""
        if self.live:
            if self.work is None:
                self.work = self.progress.add_task(step, total=total, unit="")
            self.progress.update(self.work, description=f"  {step}", completed=done, total=total)
            return
        now = time.perf_counter()
        if done >= total or not self.working or now - self.last_line >= self.interval:
            self._line(f"[{self.step}] {step} {done}/{total} ({now - self.started:.0f} s)")
        self.working = done < total

    def advance(self) -> None:
        """The current step is done."""
        if self.work is not None:
            self.progress.remove_task(self.work)
            self.work = None
        self.done += 1
        self.working = False
        if self.steps is not None:
            self.progress.advance(self.steps)

    def _line(self, text: str) -> None:
        if self.enabled and not self.live:
            print(text, file=self.stream, flush=True)
            self.last_line = time.perf_counter()


def step_progress(name: str, total: int = 0, enabled: bool = True) -> StepProgress:
    """A `StepProgress` drawing on stderr (use it as a context manager)."""
    return StepProgress(name, total, enabled=enabled)
