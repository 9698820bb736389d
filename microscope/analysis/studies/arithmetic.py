"""Confident wrong answers: where the answer of a sum appears, and where wrong subtraction answers
come from.

The OPT paper's sample: "x is 12, y is 9, x - y?" answered "-3". Prompts read
``x is A and y is B . x - y =`` (the built-in ``arithmetic`` set: ``op``, ``a``, ``b``, ``answer``
and ``split`` per prompt). The model's answer is the argmax of its next-token logits (greedy).
Measurements, each with its control (DESIGN.md "Evidence standards"):

- accuracy per operation and split, against random-init models of the same shape;
- the answer layer: the first lens point from which the lens's top-1 at the last token is the
  true answer in at least half as many prompts as the model's own output gets right (and in at
  least a tenth of all prompts: a model that is right by luck has no answer layer), and in more
  than any random-init model (each through its own tuned lens) or the same model scored against
  shuffled answers does, under the logit lens and a tuned lens (`studies.layers`);
- the mechanism of wrong subtraction answers. A wrong sign (``-(a - b)``) is also the answer of
  the *mirror* prompt, the same sum with the operands swapped (``b - a``), so the two readings are
  told apart by running the mirror prompt: a wrong answer equal to the model's own answer on its
  mirror prompt means the model ignores operand order (it answers the pair it knows);
  one with the wrong sign that the mirror prompt does not explain is a sign error proper. The
  mirror share is held against the model's answer on a random other subtraction prompt, and the
  sign-error rate on the mirror prompts themselves is reported beside it (on the organism those
  are pairs seen in training, where its planted wrong-sign noise lives).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.controls import DEFAULT_SEEDS, Controlled, random_init_scopes
from microscope.analysis.results import Result
from microscope.analysis.studies.base import first_token_id, greedy_new_tokens
from microscope.analysis.studies.layers import LENSES, LayerClaim, read_last_token
from microscope.errors import AnalysisInputError
from microscope.prompts import Prompt, load_prompts
from microscope.viz.figures import line_plot

OPS = {"+": "addition", "-": "subtraction"}
SPLIT_KEYS = {"in_distribution_heldout": "held_out"}  # summary suffix of a split (else its own name)
MIRROR_DRAWS = 20
ANSWER_SHUFFLES = 20
MIN_TOP1 = 0.1  # the least share of prompts an answer layer's lens must name the answer in
NO_TOKEN = -1


def mirror_text(prompt: Prompt) -> str | None:
    """The prompt with its operands' words swapped (``a`` <-> ``b``): the mirror sum; None when
    a == b or the text does not hold each operand once as a word."""
    a, b = str(prompt.metadata.get("a")), str(prompt.metadata.get("b"))
    words = prompt.text.split(" ")
    if a == b or words.count(a) != 1 or words.count(b) != 1:
        return None
    return " ".join(b if w == a else a if w == b else w for w in words)


def answer_top1(lens_logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """[point] share of prompts whose lens top-1 is its answer token; lens_logits [point, batch, vocab]."""
    return (lens_logits.argmax(-1) == answer_ids[None]).float().mean(-1)


def _split_key(split: str) -> str:
    return SPLIT_KEYS.get(split, split)


def _known_first_token(scope, text: str) -> int:
    try:
        return first_token_id(scope, text)
    except AnalysisInputError:
        return NO_TOKEN


@dataclass(repr=False)
class ArithmeticResult(Result):
    """Per prompt: ops, splits, a/b, answers (true values), correct_id / negated_id (first tokens of
    the answer and of its negation; -1: not a token), predicted (greedy token id) and
    predicted_text; mirror_text: the model's answer on the mirror prompt (None: no mirror).
    layers: lens point labels; claims: {lens: `LayerClaim`} of `answer_top1`; p_correct: [point,
    batch] logit-lens probability of the answer; null_accuracy: {summary key: [seed]};
    mirror_chance: the mirror share of each draw of random other prompts, by split key."""

    ops: list[str]
    splits: list[str]
    a: list[int]
    b: list[int]
    answers: torch.Tensor
    correct_id: torch.Tensor
    negated_id: torch.Tensor
    predicted: torch.Tensor
    predicted_text: list[str]
    mirror_text: list[str | None]
    layers: list[str]
    claims: dict[str, LayerClaim]
    p_correct: torch.Tensor
    null_accuracy: dict[str, list[float]]
    mirror_chance: dict[str, list[float]]
    title: str = "arithmetic: where the answer appears, where wrong answers come from"

    def accuracies(self) -> dict[str, float]:
        """``{addition,subtraction}_accuracy_<split key>`` and ``subtraction_sign_error_rate_<split key>``."""
        return accuracies(self.ops, self.splits, self.answers, self.predicted, self.correct_id, self.negated_id)

    def wrong_subtractions(self, split: str) -> list[int]:
        """Indices of the subtraction prompts of ``split`` the model answers wrongly."""
        return [i for i, (o, s) in enumerate(zip(self.ops, self.splits))
                if o == "-" and s == split and self.predicted[i] != self.correct_id[i]]

    def mirror_shares(self, split: str) -> dict[str, float | int | None]:
        """Of the wrong subtraction answers of ``split``: how many; the share equal to b - a (the
        mirror sum's true answer, also the wrong sign); the share equal to the model's own answer
        on the mirror prompt; the share with the wrong sign that the mirror does not explain."""
        wrong = self.wrong_subtractions(split)
        key = f"subtraction_wrong_{_split_key(split)}"
        out: dict[str, float | int | None] = {key: len(wrong)}
        n = len(wrong) or float("nan")
        said = [self.predicted_text[i] for i in wrong]
        mirror = [self.mirror_text[i] for i in wrong]
        out[f"{key}_share_mirror_answer"] = _share(sum(s == str(self.b[i] - self.a[i]) for s, i in zip(said, wrong)), n)
        out[f"{key}_share_model_mirror_answer"] = _share(sum(s == m for s, m in zip(said, mirror)), n)
        out[f"{key}_share_wrong_sign_not_mirror"] = _share(
            sum(s == str(-int(self.answers[i])) and s != m for s, m, i in zip(said, mirror, wrong)), n)
        return out

    def mirror_sign_error_rate(self, split: str) -> float | None:
        """Share of the mirror prompts (of the subtraction prompts of ``split``) that the model
        answers with the wrong sign: a sign error where the operands are in the other order."""
        rows = [i for i, (o, s) in enumerate(zip(self.ops, self.splits)) if o == "-" and s == split
                and self.mirror_text[i] is not None and self.a[i] != self.b[i]]
        if not rows:
            return None
        return round(sum(self.mirror_text[i] == str(self.a[i] - self.b[i]) for i in rows) / len(rows), 4)

    def mechanism(self, split: str) -> str | None:
        """'mirror' (most wrong answers are the model's answer on the mirror prompt, more often
        than another prompt's answer ever matches), 'wrong_sign' (most are a sign error the
        mirror does not explain), 'other', or None (no wrong answer)."""
        shares = self.mirror_shares(split)
        key = f"subtraction_wrong_{_split_key(split)}"
        if not shares[key]:
            return None
        model_mirror = shares[f"{key}_share_model_mirror_answer"]
        if model_mirror > 0.5 and model_mirror > max(self.mirror_chance[_split_key(split)]):
            return "mirror"
        return "wrong_sign" if shares[f"{key}_share_wrong_sign_not_mirror"] > 0.5 else "other"

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt: op, split, a, b, answer, the model's answer and its answer on the mirror prompt."""
        return pd.DataFrame(dict(op=self.ops, split=self.splits, a=self.a, b=self.b, answer=self.answers.tolist(),
                                 predicted=self.predicted_text, mirror_predicted=self.mirror_text,
                                 correct=(self.predicted == self.correct_id).tolist()))

    def figures(self) -> list[go.Figure]:
        ops = torch.tensor([o == "+" for o in self.ops])
        prob = line_plot({OPS[op]: self.p_correct[:, ops if op == "+" else ~ops].mean(-1) for op in OPS},
                         x=self.layers, title="logit-lens probability of the true answer, by layer",
                         x_title="layer", y_title="p(answer)")
        curves = {k: v for claim in self.claims.values() for k, v in claim.curves().items()}
        top1 = line_plot(curves, x=self.layers, x_title="layer", y_title="share of prompts",
                         title="the true answer is the lens's top-1 (controls: random init, shuffled answers)")
        splits = list(dict.fromkeys(self.splits))
        kinds = ("share_mirror_answer", "share_model_mirror_answer", "share_wrong_sign_not_mirror")
        mirror = go.Figure([go.Bar(name=kind, x=splits, y=[self.mirror_shares(s)[
            f"subtraction_wrong_{_split_key(s)}_{kind}"] for s in splits]) for kind in kinds])
        mirror.update_layout(title="wrong subtraction answers: the mirror sum's answer or a sign error?",
                             yaxis_title="share of wrong answers", barmode="group")
        return [prob, top1, mirror]

    def summary(self) -> dict:
        """Accuracies (with random-init controls), the answer layer under both lenses
        (``answer_layer_name``: 'embed' or 'Lk', the residual stream after block k, see
        `studies.layers`) with the top-1 rate there and its control, and per split the wrong
        subtraction answers: mirror shares (the model's-mirror share against random other
        prompts), the sign-error rate on the mirror prompts, and the mechanism named."""
        out: dict = {}
        for key, value in self.accuracies().items():
            if key in self.null_accuracy:
                out.update(_rounded(Controlled(value, self.null_accuracy[key], "random init").headline(key)))
            else:
                out[key] = value
        for claim in self.claims.values():
            out.update(claim.headline("answer_layer", "answer_top1_rate"))
        out["answer_top1_rate_by_layer"] = [round(v, 3) for v in self.claims["logit_lens"].values.tolist()]
        out["answer_top1_rate_by_layer_tuned_lens"] = [round(v, 3) for v in self.claims["tuned_lens"].values.tolist()]
        for split in dict.fromkeys(self.splits):
            key = _split_key(split)
            shares = self.mirror_shares(split)
            model_key = f"subtraction_wrong_{key}_share_model_mirror_answer"
            for k, v in shares.items():
                if k == model_key and v is not None:
                    out.update(_rounded(Controlled(v, self.mirror_chance[key], "another subtraction prompt's "
                                                   f"answer, {MIRROR_DRAWS} draws").headline(k)))
                else:
                    out[k] = v
            out[f"mirror_sign_error_rate_{key}"] = self.mirror_sign_error_rate(split)
            out[f"wrong_answer_mechanism_{key}"] = self.mechanism(split)
        out["prompts"] = len(self.ops)
        return out


def _share(count: int, n: float) -> float | None:
    return None if n != n else round(count / n, 4)


def _rounded(headline: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()}


def accuracies(ops: Sequence[str], splits: Sequence[str], answers: torch.Tensor, predicted: torch.Tensor,
               correct: torch.Tensor, negated: torch.Tensor) -> dict[str, float]:
    """Accuracy per operation and split, and the wrong-sign rate of subtraction (answers != 0)."""
    out = {}
    for split in dict.fromkeys(splits):
        for op, name in OPS.items():
            sel = torch.tensor([o == op and s == split for o, s in zip(ops, splits)])
            if sel.any():
                hits = (predicted[sel] == correct[sel]).float().mean()
                out[f"{name}_accuracy_{_split_key(split)}"] = round(float(hits), 4)
        signed = torch.tensor([o == "-" and s == split for o, s in zip(ops, splits)]) & (answers != 0)
        if signed.any():
            out[f"subtraction_sign_error_rate_{_split_key(split)}"] = round(
                float((predicted[signed] == negated[signed]).float().mean()), 4)
    return out


def _mirror_chance(said: list[str], mirror: list[str | None], ops: Sequence[str], splits: Sequence[str],
                   wrong: dict[str, list[int]]) -> dict[str, list[float]]:
    """Per split key, for each of `MIRROR_DRAWS` draws: the share of the wrong subtraction answers
    equal to the model's answer on the mirror prompt of another subtraction prompt (same split)."""
    rng = random.Random(0)
    out = {}
    for split, rows in wrong.items():
        pool = [i for i, (o, s) in enumerate(zip(ops, splits)) if o == "-" and s == split and mirror[i] is not None]
        draws = []
        for _ in range(MIRROR_DRAWS):
            hits = [said[i] == mirror[rng.choice([j for j in pool if j != i] or [i])] for i in rows]
            draws.append(sum(hits) / len(hits) if hits else 0.0)
        out[_split_key(split)] = draws
    return out


@torch.no_grad()
def run_arithmetic(scope, prompts: Sequence[Prompt] | str = "arithmetic", *, split: str | None = None,
                   seeds: Sequence[int] = DEFAULT_SEEDS) -> ArithmeticResult:
    """The arithmetic study (see module docstring), with its controls (random-init models of the
    same shape, ``seeds``).

    prompts: a built-in set name or `Prompt`s with metadata ``op`` ('+'/'-'), ``answer`` (int),
    ``a`` and ``b`` (the operands, for mirror prompts) and ``split``; split: keep only prompts of
    that split (e.g. ``"in_distribution_heldout"``)."""
    rows = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    if split is not None:
        rows = [p for p in rows if p.metadata.get("split") == split]
    missing = [i for i, p in enumerate(rows) if p.metadata.get("op") not in OPS
               or any(k not in p.metadata for k in ("answer", "a", "b"))]
    if not rows or missing:
        raise AnalysisInputError(f"arithmetic prompts need metadata 'op' ('+' or '-'), 'answer', 'a' and 'b'; "
                                 f"{len(rows)} prompts (split {split!r}), bad ones: {missing[:5]}")
    ops = [p.metadata["op"] for p in rows]
    splits = [str(p.metadata.get("split", "all")) for p in rows]
    answers = torch.tensor([int(p.metadata["answer"]) for p in rows])
    correct = torch.tensor([first_token_id(scope, str(int(a))) for a in answers])
    negated = torch.tensor([_known_first_token(scope, str(-int(a))) for a in answers])
    texts = [p.text for p in rows]
    mirrors = [mirror_text(p) if p.metadata["op"] == "-" else None for p in rows]
    mirror_rows = [i for i, m in enumerate(mirrors) if m is not None]

    def measure(model_scope):
        readings = read_last_token(model_scope, texts)
        predicted = readings.output.argmax(-1)
        stats = {lens: answer_top1(readings.logits[lens], correct) for lens in LENSES}
        return readings, predicted, stats

    readings, predicted, stats = measure(scope)
    said = [scope.tokenizer.decode([int(t)]).strip() for t in predicted]
    mirror_said: list[str | None] = [None] * len(rows)
    if mirror_rows:
        on_mirror = greedy_new_tokens(scope, [mirrors[i] for i in mirror_rows], 1)[:, 0]
        for i, t in zip(mirror_rows, on_mirror):
            mirror_said[i] = scope.tokenizer.decode([int(t)]).strip()
    null = [measure(s) for s in random_init_scopes(scope, seeds)]
    null_accuracy = [accuracies(ops, splits, answers, n[1], correct, negated) for n in null]
    accuracy = float((predicted == correct).float().mean())
    g = torch.Generator().manual_seed(0)
    orders = [torch.randperm(len(rows), generator=g) for _ in range(ANSWER_SHUFFLES)]
    claims = {lens: LayerClaim(lens=lens, layers=readings.layers, values=stats[lens],
                               null=torch.stack([n[2][lens] for n in null]
                                                + [answer_top1(readings.logits[lens], correct[o]) for o in orders]),
                               kl=readings.kl[lens], floor=max(0.5 * accuracy, MIN_TOP1),
                               statistic="true answer top-1",
                               control=f"random init x{len(seeds)}, shuffled answers x{ANSWER_SHUFFLES}")
              for lens in LENSES}
    result = ArithmeticResult(
        ops=ops, splits=splits, a=[int(p.metadata["a"]) for p in rows], b=[int(p.metadata["b"]) for p in rows],
        answers=answers, correct_id=correct, negated_id=negated, predicted=predicted, predicted_text=said,
        mirror_text=mirror_said, layers=readings.layers, claims=claims,
        p_correct=readings.logits["logit_lens"].softmax(-1)[:, torch.arange(len(rows)), correct],
        null_accuracy={k: [n[k] for n in null_accuracy] for k in null_accuracy[0] if "accuracy" in k},
        mirror_chance={})
    wrong = {s: result.wrong_subtractions(s) for s in dict.fromkeys(splits)}
    result.mirror_chance = _mirror_chance(said, mirror_said, ops, splits, wrong)
    return result
