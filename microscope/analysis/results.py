"""The one contract of every analysis and study result: headline numbers, figures, a table.

Every tool in `microscope.analysis` (and every study) returns a `Result` subclass (a dataclass
holding tensors) with

- ``.summary()`` -> a flat dict of headline numbers (JSON-ready: numbers, strings, lists, None);
- ``.figures()`` -> a list of `plotly.graph_objects.Figure`, the standard pictures of that result;
- ``.to_frame()`` -> `pandas.DataFrame`, one row per measured thing (tidy, ready for groupby/plots);
- ``.title`` -> one line naming what was measured (the note under its section of a report);
- ``.findings()`` -> what was found, in words: one sentence per headline claim, each ending in
  whether it CLEARS its control or does NOT (`controls.Controlled.sentence`); [] for a result
  that makes no claim;
- ``.report_html()`` -> HTML of its own for the experiment report, shown after its figures
  ("" unless a result has more to show, e.g. the feature dashboards);
- ``_repr_html_`` so that a result shown in JupyterLab prints its title, its scalar headline
  numbers and the first rows of its frame (not its tensors).
"""

from __future__ import annotations

import html
from abc import ABC, abstractmethod

import pandas as pd
import plotly.graph_objects as go

HTML_ROWS = 8  # rows of the frame shown by _repr_html_
HEADLINE_DIGITS = 4

Summary = dict[str, float | int | str | list | None]


class Result(ABC):
    """Base of analysis results. Subclasses set `title` and implement `summary`, `figures`, `to_frame`
    (and `report_html` when they have HTML of their own). The workbench reads nothing else."""

    title: str = "result"

    @abstractmethod
    def summary(self) -> Summary:
        """The headline numbers, flat and JSON-ready."""

    @abstractmethod
    def figures(self) -> list[go.Figure]:
        """The standard pictures of this result."""

    @abstractmethod
    def to_frame(self) -> pd.DataFrame:
        """One row per measured thing."""

    def findings(self) -> list[str]:
        """What was found, one sentence per headline claim with its verdict ([]: no claim)."""
        return []

    def report_html(self) -> str:
        """HTML shown after the figures in an experiment report ("": none)."""
        return ""

    def summary_line(self) -> str:
        """The headline numbers on one line (scalars only)."""
        return ", ".join(f"{k}={_short(v)}" for k, v in self.summary().items()
                         if isinstance(v, (int, float, str)) or v is None)

    def __repr__(self) -> str:
        line = self.summary_line()
        return f"<{type(self).__name__} {self.title}{': ' + line if line else ''}>"

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        table = frame.head(HTML_ROWS).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
        line = html.escape(self.summary_line())
        return (f"<div><b>{html.escape(type(self).__name__)}</b> {html.escape(self.title)}"
                f"{'<br>' + line if line else ''}{table}<p><i>{len(frame)} rows: .to_frame(); "
                f"headline numbers: .summary(); pictures: .figures()</i></p></div>")


def rounded(x, digits: int = HEADLINE_DIGITS) -> float:
    """``x`` (a number, numpy or torch scalar) as a float rounded to ``digits``: a headline number."""
    return round(float(x), digits)


def round_headline(numbers: dict) -> dict:
    """``numbers`` with every float `rounded` (other values as they are)."""
    return {k: rounded(v) if isinstance(v, float) else v for k, v in numbers.items()}


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
