"""The shared shape of every analysis result: a table, a figure, and a compact notebook view.

Every tool in `microscope.analysis` returns a `Result` subclass (a dataclass holding tensors) with

- ``.to_frame()`` -> `pandas.DataFrame`, one row per measured thing (tidy, ready for groupby/plots);
- ``.figure()`` -> `plotly.graph_objects.Figure`, the standard picture of that result;
- ``_repr_html_`` so that a result shown in JupyterLab prints its title, a one-line summary and
  the first rows of its frame (not its tensors).
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

HTML_ROWS = 8  # rows of the frame shown by _repr_html_


class Result:
    """Base of analysis results. Subclasses set `title` and implement `to_frame` and `figure`."""

    title: str = "result"

    def to_frame(self) -> pd.DataFrame:
        raise NotImplementedError(f"{type(self).__name__} must implement to_frame()")

    def figure(self) -> go.Figure:
        raise NotImplementedError(f"{type(self).__name__} must implement figure()")

    def summary(self) -> str:
        """One line stating the headline number(s) of this result."""
        return ""

    def __repr__(self) -> str:
        line = self.summary()
        return f"<{type(self).__name__} {self.title}{': ' + line if line else ''}>"

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        head = frame.head(HTML_ROWS).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
        more = f"<p><i>{len(frame) - HTML_ROWS} more rows: .to_frame(); picture: .figure()</i></p>" \
            if len(frame) > HTML_ROWS else "<p><i>picture: .figure()</i></p>"
        summary = html.escape(self.summary())
        return (f"<div><b>{html.escape(type(self).__name__)}</b> {html.escape(self.title)}"
                f"{'<br>' + summary if summary else ''}{head}{more}</div>")
