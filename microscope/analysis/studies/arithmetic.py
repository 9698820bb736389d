"""Confident wrong answers: where the answer of a sum appears, and where wrong subtraction answers
come from.

The OPT paper's sample: "x is 12, y is 9, x - y?" answered "-3". A prompt states two operands and
asks for their sum or difference (metadata ``op``, ``a``, ``b``, ``answer`` and ``split``), e.g.
``Question: If x is 12 and y is 9, what is x - y?\nAnswer:``. The model's answer is the first
number of its greedy continuation (as many tokens as the longest answer needs: with OPT's BPE a
negative answer is two tokens, `` -`` then the digits, so a first-token reading would count every
negative answer right once the model says `` -``). Measurements, each with its control
(docs/evidence.md "Controls"):

- accuracy per operation and split, against random-init models of the same shape;
- the answer layer: on the prompts whose answer is one token, the first lens point from which the
  lens's top-1 at the last token is the true answer in at least half as many prompts as the model's own output gets right (and in at
  least a tenth of all prompts: a model that is right by luck has no answer layer), and in more
  than any random-init model (each through its own tuned lens) or the same model scored against
  shuffled answers does, under the logit lens and a tuned lens (`studies.layers`);
- the mechanism of wrong subtraction answers. A wrong sign (``-(a - b)``) is also the answer of
  the *mirror* prompt, the same sum with the operands swapped (``b - a``), so the readings are told
  apart by running the mirror prompt too. Of the wrong answers: ``mirror`` = b - a while the model
  also answers the mirror prompt b - a (it gives the answer of the pair it knows); ``wrong_sign``
  = b - a while it answers the mirror prompt otherwise (a sign error proper); ``order_blind`` =
  the same wrong answer on both prompts, not b - a (it ignores operand order, as an untrained
  model does too). Each share is held against random-init models; the mechanism named is the
  share above 0.5 that clears its control. The sign-error rate on the mirror prompts is reported
  beside (on the organism those are pairs seen in training, where its planted noise lives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import re

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.controls import DEFAULT_SEEDS, RATE_MIN_GAP, Controlled, random_init_scopes, sentence
from microscope.analysis.progress import Progress, report
from microscope.analysis.results import Result, round_headline, rounded
from microscope.analysis.studies.base import greedy_new_tokens, rows_of, split_of, split_suffix
from microscope.analysis.studies.layers import LENS_STEPS, LENSES, LayerClaim, kl_figure, read_last_token
from microscope.errors import AnalysisInputError
from microscope.prompts import Prompt
from microscope.viz.figures import line_plot

OPS = {"+": "addition", "-": "subtraction"}
# each mechanism of a wrong subtraction answer -> its share's name in the keys of `mirror_shares`
MECHANISMS = {"mirror": "share_mirror_pair_answer", "wrong_sign": "share_wrong_sign_not_mirror",
              "order_blind": "share_order_blind"}
ANSWER_SHUFFLES = 20
MIN_TOP1 = 0.1  # the least share of prompts an answer layer's lens must name the answer in
NUMBER = re.compile(r"(?<![\d-])-?\d+(?!\d)")


def mirror_text(prompt: Prompt) -> str | None:
    """The prompt with its operands swapped (``a`` <-> ``b``, as whole numbers): the mirror sum;
    None when a == b or the text does not hold each operand once as a number."""
    a, b = str(prompt.metadata.get("a")), str(prompt.metadata.get("b"))
    numbers = NUMBER.findall(prompt.text)
    if a == b or numbers.count(a) != 1 or numbers.count(b) != 1:
        return None
    return NUMBER.sub(lambda m: b if m.group() == a else a if m.group() == b else m.group(), prompt.text)


def read_answer(text: str) -> str:
    """The answer in a continuation: the number it starts with (``" -3\nQuestion"`` -> ``"-3"``),
    else its first word (or "" when it is blank): a wrong answer, shown as said."""
    match = re.match(r"\s*(-?\d+)", text)
    if match:
        return match.group(1)
    words = text.split()
    return words[0] if words else ""


def answer_top1(lens_logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """[point] share of prompts whose lens top-1 is its answer token; lens_logits [point, batch, vocab]."""
    return (lens_logits.argmax(-1) == answer_ids[None]).float().mean(-1)


def answer_tokens(scope, answers: Sequence[int]) -> list[list[int]]:
    """Each answer's tokens as it follows ``"Answer:"`` (a leading space)."""
    return [scope.tokenizer(" " + str(int(a)), add_special_tokens=False)["input_ids"] for a in answers]


def said_answers(scope, texts: Sequence[str], new_tokens: int) -> list[str]:
    """`read_answer` of each greedy continuation of ``new_tokens`` tokens."""
    rows = greedy_new_tokens(scope, texts, new_tokens)
    return [read_answer(scope.tokenizer.decode(row.tolist())) for row in rows]


@dataclass(repr=False)
class ArithmeticResult(Result):
    """Per prompt: ops, splits, a/b, answers (true values), correct_id (the answer's first token),
    single (whether the answer is that one token: the prompts the lens claims are read on),
    predicted_text (the model's answer, `read_answer`); mirror_text: its answer on the mirror
    prompt (None: no mirror). layers: lens point labels; claims: {lens: `LayerClaim`} of
    `answer_top1`; p_correct: [point, batch] logit-lens probability of the answer's first token;
    null_accuracy: {summary key: [seed]}; null_shares: the `mirror_shares` of each random-init
    model, by split."""

    ops: list[str]
    splits: list[str]
    a: list[int]
    b: list[int]
    answers: torch.Tensor
    correct_id: torch.Tensor
    single: torch.Tensor
    predicted_text: list[str]
    mirror_text: list[str | None]
    layers: list[str]
    claims: dict[str, LayerClaim]
    p_correct: torch.Tensor
    null_accuracy: dict[str, list[float]]
    null_shares: dict[str, list[dict]]
    title: str = "arithmetic: where the answer appears, where wrong answers come from"

    def accuracies(self) -> dict[str, float]:
        """``{addition,subtraction}_accuracy`` and ``subtraction_sign_error_rate`` per split (keys
        ending in its `split_suffix`)."""
        return accuracies(self.ops, self.splits, self.answers, self.predicted_text)

    def mirror_shares(self, split: str) -> dict[str, float | int | None]:
        """`mirror_shares` of the model on ``split``."""
        return mirror_shares(self.ops, self.splits, self.a, self.b, self.answers, self.predicted_text,
                             self.mirror_text, split)

    def mirror_sign_error_rate(self, split: str) -> float | None:
        """Share of the mirror prompts (of the subtraction prompts of ``split``) that the model
        answers with the wrong sign: a sign error where the operands are in the other order."""
        rows = [i for i, (o, s) in enumerate(zip(self.ops, self.splits)) if o == "-" and s == split
                and self.mirror_text[i] is not None and self.a[i] != self.b[i]]
        if not rows:
            return None
        return rounded(sum(self.mirror_text[i] == str(self.a[i] - self.b[i]) for i in rows) / len(rows))

    def mechanism(self, split: str) -> str | None:
        """The one of `MECHANISMS` whose share of the wrong answers is > 0.5 and clears its
        random-init control (`Controlled`), else 'other'; None when no subtraction is answered wrongly."""
        shares, end = self.mirror_shares(split), split_suffix(split)
        if not shares[f"subtraction_wrong{end}"]:
            return None
        for name, share_name in MECHANISMS.items():
            key = f"subtraction_wrong_{share_name}{end}"
            share = shares[key]
            null = [n[key] or 0.0 for n in self.null_shares[split]]
            if share > 0.5 and Controlled(share, null, "random init", min_gap=RATE_MIN_GAP).clears:
                return name
        return "other"

    def findings(self) -> list[str]:
        """Accuracy by operation, where the answer appears, and what wrong subtractions are, in words."""
        numbers = self.summary()
        layer = numbers["answer_layer_name"]
        return [sentence(numbers, "addition_accuracy", "held-out additions are answered correctly at a rate of"),
                sentence(numbers, "subtraction_accuracy", "held-out subtractions are answered correctly at a rate of"),
                sentence(numbers, "answer_top1_rate", f"the answer appears at {layer or 'no layer'} (logit lens): the "
                                                      f"true answer is the top token there for a share of"),
                f"wrong subtractions: {numbers.get('subtraction_wrong')} of them; the mechanism named: "
                f"{numbers.get('wrong_answer_mechanism') or 'none'}"]

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt: op, split, a, b, answer, the model's answer and its answer on the mirror prompt."""
        return pd.DataFrame(dict(op=self.ops, split=self.splits, a=self.a, b=self.b, answer=self.answers.tolist(),
                                 predicted=self.predicted_text, mirror_predicted=self.mirror_text,
                                 correct=[s == str(int(a)) for s, a in zip(self.predicted_text, self.answers)]))

    def figures(self) -> list[go.Figure]:
        ops = torch.tensor([o == "+" for o in self.ops])
        prob = line_plot({OPS[op]: self.p_correct[:, ops if op == "+" else ~ops].mean(-1) for op in OPS},
                         x=self.layers, title="logit-lens probability of the true answer, by layer",
                         x_title="layer", y_title="p(answer)")
        curves = {k: v for claim in self.claims.values() for k, v in claim.curves().items()}
        top1 = line_plot(curves, x=self.layers, x_title="layer", y_title="share of prompts",
                         title="the true answer is the lens's top-1 (controls: random init, shuffled answers)")
        splits = list(dict.fromkeys(self.splits))
        mirror = go.Figure([go.Bar(name=name, x=splits, y=[self.mirror_shares(s)[
            f"subtraction_wrong_{share_name}{split_suffix(s)}"] for s in splits])
            for name, share_name in MECHANISMS.items()])
        mirror.update_layout(title="wrong subtraction answers: the mirror sum's answer or a sign error?",
                             yaxis_title="share of wrong answers", barmode="group")
        return [prob, top1, mirror, kl_figure(self.claims)]

    def summary(self) -> dict:
        """Accuracies (with random-init controls), the answer layer under both lenses
        (``answer_layer_name``: 'embed' or 'Lk', the residual stream after block k, see
        `studies.layers`) with the top-1 rate there and its control, and per split the wrong
        subtraction answers: the shares of `mirror_shares` against random-init models, the
        sign-error rate on the mirror prompts, and the mechanism named."""
        out: dict = {}
        for key, value in self.accuracies().items():
            if key in self.null_accuracy:
                out.update(round_headline(Controlled(value, self.null_accuracy[key], "random init",
                                                     min_gap=RATE_MIN_GAP).headline(key)))
            else:
                out[key] = value
        for claim in self.claims.values():
            out.update(claim.headline("answer_layer", "answer_top1_rate"))
        out["answer_top1_rate_by_layer"] = [rounded(v, 3) for v in self.claims["logit_lens"].values.tolist()]
        out["answer_top1_rate_by_layer_tuned_lens"] = [rounded(v, 3) for v in self.claims["tuned_lens"].values.tolist()]
        for split in dict.fromkeys(self.splits):
            for k, v in self.mirror_shares(split).items():
                null = [n[k] or 0.0 for n in self.null_shares[split]]
                if "_share_" in k and v is not None:
                    out.update(round_headline(Controlled(v, null, "random init", min_gap=RATE_MIN_GAP).headline(k)))
                else:
                    out[k] = v
            out[f"mirror_sign_error_rate{split_suffix(split)}"] = self.mirror_sign_error_rate(split)
            out[f"wrong_answer_mechanism{split_suffix(split)}"] = self.mechanism(split)
        out["prompts"] = len(self.ops)
        return out


def _share(count: int, n: float) -> float | None:
    return None if n != n else rounded(count / n)


def accuracies(ops: Sequence[str], splits: Sequence[str], answers: torch.Tensor,
               said: Sequence[str]) -> dict[str, float]:
    """Accuracy per operation and split (the answer said is the true one), and the wrong-sign
    rate of subtraction (answers != 0: the answer said is the negated one)."""
    out = {}
    right = torch.tensor([s == str(int(a)) for s, a in zip(said, answers)])
    negated = torch.tensor([s == str(-int(a)) for s, a in zip(said, answers)])
    for split in dict.fromkeys(splits):
        for op, name in OPS.items():
            sel = torch.tensor([o == op and s == split for o, s in zip(ops, splits)])
            if sel.any():
                out[f"{name}_accuracy{split_suffix(split)}"] = rounded(right[sel].float().mean())
        signed = torch.tensor([o == "-" and s == split for o, s in zip(ops, splits)]) & (answers != 0)
        if signed.any():
            out[f"subtraction_sign_error_rate{split_suffix(split)}"] = rounded(negated[signed].float().mean())
    return out


def mirror_shares(ops: Sequence[str], splits: Sequence[str], a: Sequence[int], b: Sequence[int],
                  answers: torch.Tensor, said: Sequence[str], mirror: Sequence[str | None],
                  split: str) -> dict[str, float | int | None]:
    """Of the subtraction prompts of ``split`` answered wrongly (``said`` != answer): how many; the
    share equal to b - a (the mirror sum's true answer, also the wrong sign); the share equal to
    the answer on the mirror prompt (``mirror``); and the shares of the three `MECHANISMS`. Keys:
    ``subtraction_wrong``, ``subtraction_wrong_share_<what>``, each ending in the split's
    `split_suffix`."""
    wrong = [i for i, (o, s) in enumerate(zip(ops, splits))
             if o == "-" and s == split and said[i] != str(int(answers[i]))]
    n = len(wrong) or float("nan")
    flipped = {i: said[i] == str(b[i] - a[i]) for i in wrong}
    same = {i: said[i] == mirror[i] for i in wrong}
    shares = {"share_mirror_answer": _share(sum(flipped.values()), n),
              "share_model_mirror_answer": _share(sum(same.values()), n),
              MECHANISMS["mirror"]: _share(sum(flipped[i] and same[i] for i in wrong), n),
              MECHANISMS["wrong_sign"]: _share(sum(flipped[i] and not same[i] for i in wrong), n),
              MECHANISMS["order_blind"]: _share(sum(same[i] and not flipped[i] for i in wrong), n)}
    end = split_suffix(split)
    return {f"subtraction_wrong{end}": len(wrong), **{f"subtraction_wrong_{k}{end}": v for k, v in shares.items()}}


@torch.no_grad()
def run_arithmetic(scope, prompts: Sequence[Prompt] | str = "arithmetic", *, split: str | None = None,
                   seeds: Sequence[int] = DEFAULT_SEEDS, lens_steps: int = LENS_STEPS,
                   progress: Progress | None = None) -> ArithmeticResult:
    """The arithmetic study (see module docstring), with its controls (random-init models of the
    same shape, ``seeds``).

    prompts: a built-in set name or `Prompt`s with metadata ``op`` ('+'/'-'), ``answer`` (int),
    ``a`` and ``b`` (the operands, for mirror prompts) and ``split``; split: keep only prompts of
    that split (e.g. ``"in_distribution_heldout"``); lens_steps: Adam steps of each tuned lens (most of the
    study's cost on a large vocabulary); progress: hears each piece of work as it
    finishes (`analysis.progress`)."""
    rows = rows_of(prompts)
    if split is not None:
        rows = [p for p in rows if p.metadata.get("split") == split]
    missing = [i for i, p in enumerate(rows) if p.metadata.get("op") not in OPS
               or any(k not in p.metadata for k in ("answer", "a", "b"))]
    if not rows or missing:
        raise AnalysisInputError(f"arithmetic prompts need metadata 'op' ('+' or '-'), 'answer', 'a' and 'b'; "
                                 f"{len(rows)} prompts (split {split!r}), bad ones: {missing[:5]}")
    ops = [p.metadata["op"] for p in rows]
    splits = [split_of(p) for p in rows]
    answers = torch.tensor([int(p.metadata["answer"]) for p in rows])
    tokens = answer_tokens(scope, answers.tolist())
    correct = torch.tensor([t[0] for t in tokens])
    single = torch.tensor([len(t) == 1 for t in tokens])
    if not single.any():
        raise AnalysisInputError("no answer of these prompts is one token of this tokenizer: the answer layer "
                                 "is read on one-token answers; give prompts with small answers")
    new_tokens = max(len(t) for t in tokens + answer_tokens(scope, (-answers).tolist())) + 1   # and a sign error
    texts = [p.text for p in rows]
    mirrors = [mirror_text(p) if p.metadata["op"] == "-" else None for p in rows]
    mirror_rows = [i for i, m in enumerate(mirrors) if m is not None]
    lens_rows = single.nonzero()[:, 0]

    a, b = [int(p.metadata["a"]) for p in rows], [int(p.metadata["b"]) for p in rows]

    def measure(model_scope):
        """(lens readings, {lens: top-1 statistic on one-token answers}, answers said, answers on mirrors)."""
        readings = read_last_token(model_scope, texts, lens_steps=lens_steps)
        stats = {lens: answer_top1(readings.logits[lens][:, lens_rows], correct[lens_rows]) for lens in LENSES}
        on_mirror: list[str | None] = [None] * len(rows)
        if mirror_rows:
            for i, said in zip(mirror_rows, said_answers(model_scope, [mirrors[i] for i in mirror_rows], new_tokens)):
                on_mirror[i] = said
        return readings, stats, said_answers(model_scope, texts, new_tokens), on_mirror

    readings, stats, said, mirror_said = measure(scope)
    report(progress, "lenses, answers, mirror prompts")
    null = [measure(s) for s in random_init_scopes(scope, seeds, progress=progress)]
    null_accuracy = [accuracies(ops, splits, answers, n[2]) for n in null]
    accuracy = float(torch.tensor([x == str(int(y)) for x, y in zip(said, answers)])[lens_rows].float().mean())
    g = torch.Generator().manual_seed(0)
    orders = [lens_rows[torch.randperm(len(lens_rows), generator=g)] for _ in range(ANSWER_SHUFFLES)]
    claims = {lens: LayerClaim(lens=lens, layers=readings.layers, values=stats[lens],
                               null=torch.stack([n[1][lens] for n in null]
                                                + [answer_top1(readings.logits[lens][:, lens_rows], correct[o])
                                                   for o in orders]),
                               kl=readings.kl[lens], floor=max(0.5 * accuracy, MIN_TOP1),
                               statistic="true answer top-1",
                               control=f"random init x{len(seeds)}, shuffled answers x{ANSWER_SHUFFLES}")
              for lens in LENSES}
    return ArithmeticResult(
        ops=ops, splits=splits, a=a, b=b, answers=answers, correct_id=correct, single=single,
        predicted_text=said, mirror_text=mirror_said, layers=readings.layers, claims=claims,
        p_correct=readings.logits["logit_lens"].softmax(-1)[:, torch.arange(len(rows)), correct],
        null_accuracy={k: [n[k] for n in null_accuracy] for k in null_accuracy[0] if "accuracy" in k},
        null_shares={s: [mirror_shares(ops, splits, a, b, answers, n[2], n[3], s) for n in null]
                     for s in dict.fromkeys(splits)})
