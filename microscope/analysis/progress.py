"""How a long analysis says how far it is: it calls ``progress(step, done, total)`` as it goes.

    def run_study(scope, ..., progress: Progress | None = None):
        for rand in random_init_scopes(scope, seeds, progress=progress):   # "random-init controls" k/n
            ...
        report(progress, "steering sweep")                                  # one unit of work, done

`step` names a piece of the work ("random-init controls"); `done` of its `total` units are
finished. Nothing in `microscope.analysis` draws: the workbench (`workbench.progress`) and the
command line draw the reports as a live bar, or as plain lines in a batch job's log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Progress = Callable[[str, int, int], None]   # (step, done, total)

T = TypeVar("T")


def report(progress: Progress | None, step: str, done: int = 1, total: int = 1) -> None:
    """Tell `progress` (when there is one) that `done` of the `total` units of `step` are finished."""
    if progress is not None:
        progress(step, done, total)


def counted(items: Iterable[T], total: int, step: str, progress: Progress | None) -> Iterator[T]:
    """`items` one by one, reporting ``(step, k, total)`` before item k and ``(step, total, total)``
    once the last one is done."""
    for done, item in enumerate(items):
        report(progress, step, done, total)
        yield item
    report(progress, step, total, total)
