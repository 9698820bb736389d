"""Confident wrong answers: the logit lens on the answer token of addition and subtraction sums.

The OPT paper's sample: "x is 12, y is 9, x - y?" answered "-3". Prompts read
``x is A and y is B . x - y =`` (the built-in ``arithmetic`` set: ``op``, ``a``, ``b``, ``answer``
per prompt). At the prompt's last token, every layer's residual is read through the final path
(`lens.logit_lens`), and for each layer:

- ``p_correct``: lens probability of the true answer's first token;
- ``rank``: its rank (0 = top-1);
- ``sign_margin`` (answers != 0): lens logit of the true answer minus that of the negated answer
  (first tokens): > 0 when the layer prefers the right sign. For a subtraction answered with the
  wrong sign, ``flip_layer`` is the first layer from which the negated answer stays ahead: where
  the sign goes wrong.

The model's own answer is the argmax of its real next-token logits (greedy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.lens import logit_lens
from microscope.analysis.results import Result
from microscope.analysis.studies.base import first_layer_from, first_token_id
from microscope.errors import AnalysisInputError
from microscope.prompts import Prompt, load_prompts
from microscope.viz.figures import line_plot

OPS = {"+": "addition", "-": "subtraction"}


@dataclass(repr=False)
class ArithmeticResult(Result):
    """Per prompt x layer lens readings of the answer token.

    layers: lens point labels ('embed', 'L0', ...); ops, splits: per prompt; answers: true values
    [batch]; p_correct, rank, sign_margin: [layer, batch] (sign_margin NaN where answer == 0);
    predicted: [batch] the model's greedy answer token id; correct_id, negated_id: [batch];
    predicted_text: decoded predictions."""

    layers: list[str]
    ops: list[str]
    splits: list[str]
    answers: torch.Tensor
    p_correct: torch.Tensor
    rank: torch.Tensor
    sign_margin: torch.Tensor
    predicted: torch.Tensor
    correct_id: torch.Tensor
    negated_id: torch.Tensor
    predicted_text: list[str]
    title: str = "arithmetic: logit lens on the answer"

    def _mask(self, op: str) -> torch.Tensor:
        return torch.tensor([o == op for o in self.ops])

    def accuracy(self, op: str) -> float:
        sel = self._mask(op)
        return float((self.predicted[sel] == self.correct_id[sel]).float().mean()) if sel.any() else float("nan")

    def sign_errors(self, op: str = "-") -> torch.Tensor:
        """Bool [batch]: prompts of ``op`` with answer != 0 whose greedy answer is the negated one."""
        return self._mask(op) & (self.answers != 0) & (self.predicted == self.negated_id)

    def flip_layers(self) -> list[int | None]:
        """For each sign error (in prompt order), the first layer from which the wrong sign stays ahead."""
        rows = self.sign_errors().nonzero().flatten().tolist()
        return [first_layer_from((self.sign_margin[:, b] < 0).tolist()) for b in rows]

    def layer_means(self, values: torch.Tensor, mask: torch.Tensor) -> list[float]:
        return [float(v) for v in values[:, mask].nanmean(-1)] if mask.any() else [float("nan")] * len(self.layers)

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt x layer: op, split, answer, layer, p_correct, rank, sign_margin, predicted."""
        rows = []
        for b in range(len(self.ops)):
            for l, layer in enumerate(self.layers):
                rows.append(dict(prompt=b, op=self.ops[b], split=self.splits[b], answer=int(self.answers[b]),
                                 layer=layer, p_correct=float(self.p_correct[l, b]), rank=int(self.rank[l, b]),
                                 sign_margin=float(self.sign_margin[l, b]), predicted=self.predicted_text[b]))
        return pd.DataFrame(rows)

    def figures(self) -> list[go.Figure]:
        prob = line_plot({OPS[op]: self.layer_means(self.p_correct, self._mask(op)) for op in OPS},
                         x=self.layers, title="lens probability of the true answer, by layer",
                         x_title="layer", y_title="p(answer)")
        errors = self.sign_errors()
        right = self._mask("-") & (self.answers != 0) & ~errors
        sign = line_plot({"subtraction answered right": self.layer_means(self.sign_margin, right),
                          "subtraction with the sign wrong": self.layer_means(self.sign_margin, errors),
                          "addition": self.layer_means(self.sign_margin, self._mask("+") & (self.answers != 0))},
                         x=self.layers, hline=0.0, title="logit(true answer) - logit(negated answer), by layer",
                         x_title="layer", y_title="sign margin (logits)")
        return [prob, sign]

    def summary(self) -> dict:
        sub = self._mask("-") & (self.answers != 0)
        errors = self.sign_errors()
        flips = [f for f in self.flip_layers() if f is not None]
        margin = self.layer_means(self.sign_margin, sub)
        return {
            "addition_accuracy": round(self.accuracy("+"), 4),
            "subtraction_accuracy": round(self.accuracy("-"), 4),
            "subtraction_sign_error_rate": round(float(errors.sum() / sub.sum()), 4) if sub.any() else None,
            "sign_errors": int(errors.sum()),
            "median_flip_layer": self.layers[sorted(flips)[len(flips) // 2]] if flips else None,
            "addition_answer_layer": self._answer_layer("+"),
            "subtraction_answer_layer": self._answer_layer("-"),
            "subtraction_sign_margin_by_layer": [round(m, 3) for m in margin],
            "prompts": len(self.ops),
        }

    def _answer_layer(self, op: str) -> str | None:
        """First layer from which the true answer is the lens's top-1 for most prompts of ``op``."""
        sel = self._mask(op)
        if not sel.any():
            return None
        top1 = (self.rank[:, sel] == 0).float().mean(-1)
        layer = first_layer_from((top1 > 0.5).tolist())
        return None if layer is None else self.layers[layer]


@torch.no_grad()
def run_arithmetic(scope, prompts: Sequence[Prompt] | str = "arithmetic", *, split: str | None = None
                   ) -> ArithmeticResult:
    """Logit lens on the answer token of each sum (see module docstring).

    prompts: a built-in set name or `Prompt`s with metadata ``op`` ('+'/'-'), ``answer`` (int) and
    optionally ``split``; split: keep only prompts of that split (e.g. ``"held_out"``)."""
    rows = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    if split is not None:
        rows = [p for p in rows if p.metadata.get("split") == split]
    missing = [i for i, p in enumerate(rows) if p.metadata.get("op") not in OPS or "answer" not in p.metadata]
    if not rows or missing:
        raise AnalysisInputError(f"arithmetic prompts need metadata 'op' ('+' or '-') and 'answer'; "
                                 f"{len(rows)} prompts, bad ones: {missing[:5]}")
    answers = torch.tensor([int(p.metadata["answer"]) for p in rows])
    correct = torch.tensor([first_token_id(scope, str(int(a))) for a in answers])
    negated = torch.tensor([_known_first_token(scope, str(-int(a))) for a in answers])  # -1: not a token

    lens = logit_lens(scope, [p.text for p in rows], position="last")
    logits = lens.logits[:, :, 0]  # [layer, batch, vocab]
    probs = logits.softmax(-1)
    index = torch.arange(len(rows))
    right = logits[:, index, correct]
    p_correct = probs[:, index, correct]
    rank = (logits > right[..., None]).sum(-1)
    margin = right - logits[:, index, negated.clamp(min=0)]
    margin[:, (answers == 0) | (negated < 0)] = float("nan")
    predicted = lens.model_logits[:, 0].argmax(-1)
    return ArithmeticResult(layers=lens.layers, ops=[p.metadata["op"] for p in rows],
                            splits=[str(p.metadata.get("split", "")) for p in rows], answers=answers,
                            p_correct=p_correct, rank=rank, sign_margin=margin, predicted=predicted,
                            correct_id=correct, negated_id=negated,
                            predicted_text=[scope.tokenizer.decode([int(t)]).strip() for t in predicted])


def _known_first_token(scope, text: str) -> int:
    try:
        return first_token_id(scope, text)
    except AnalysisInputError:
        return -1
