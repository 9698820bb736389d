"""What every study result shares: a dict of headline numbers, several figures, a notebook view.

A study result is an analysis `Result` (``.to_frame()``, ``.figure()``) whose ``.summary()`` is a
flat dict of headline numbers (the main job writes it to JSON) and whose ``.figures()`` lists every
picture it has (``.figure()`` is the first).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go
import torch

from microscope.analysis.results import HTML_ROWS, Result
from microscope.errors import AnalysisInputError


class StudyResult(Result):
    """Base of the four failure-mode study results."""

    def summary(self) -> dict[str, float | int | str | list | None]:
        raise NotImplementedError(f"{type(self).__name__} must implement summary()")

    def figures(self) -> list[go.Figure]:
        raise NotImplementedError(f"{type(self).__name__} must implement figures()")

    def figure(self) -> go.Figure:
        return self.figures()[0]

    def summary_line(self) -> str:
        """The headline numbers on one line (scalars only)."""
        return ", ".join(f"{k}={_short(v)}" for k, v in self.summary().items()
                         if isinstance(v, (int, float, str)) or v is None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.title}: {self.summary_line()}>"

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        table = frame.head(HTML_ROWS).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
        return (f"<div><b>{html.escape(type(self).__name__)}</b> {html.escape(self.title)}<br>"
                f"{html.escape(self.summary_line())}{table}<p><i>{len(frame)} rows: .to_frame(); "
                f"pictures: .figures()</i></p></div>")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def first_token_id(scope, text: str) -> int:
    """Id of the first token of ``text`` as it would follow a prompt (a leading space is added,
    as after a word in running text). Raises if the tokenizer maps it to its unknown token."""
    ids = scope.tokenizer(" " + text.lstrip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise AnalysisInputError(f"{text!r} tokenizes to nothing")
    if scope.tokenizer.unk_token_id is not None and ids[0] == scope.tokenizer.unk_token_id:
        raise AnalysisInputError(f"{text!r} is not in this tokenizer's vocabulary (it maps to the unknown token)")
    return int(ids[0])


def single_token_id(scope, word: str) -> int:
    """Id of ``word`` (after a space) when it is exactly one known token; raises otherwise."""
    ids = scope.tokenizer(" " + word.lstrip(), add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == scope.tokenizer.unk_token_id:
        raise AnalysisInputError(f"{word!r} is not one token of this tokenizer ({ids}); give one-token words")
    return int(ids[0])


def first_layer_from(flags: list[bool]) -> int | None:
    """Index of the first entry from which every later entry is True (None if the last is False)."""
    if not flags or not flags[-1]:
        return None
    index = len(flags) - 1
    while index > 0 and flags[index - 1]:
        index -= 1
    return index


def greedy_new_tokens(scope, texts: Sequence[str], max_new_tokens: int, hooks: dict | None = None
                      ) -> torch.Tensor:
    """LongTensor [batch, max_new_tokens]: greedy continuations (`scope.generate`, ``hooks`` in force
    at every step). The end-of-text token is an ordinary token here, so every row runs the full
    length and loops are seen whole."""
    out = scope.generate(list(texts), max_new_tokens=max_new_tokens, hooks=hooks, do_sample=False,
                         eos_token_id=None)
    return out.new_tokens.cpu()
