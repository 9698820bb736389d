"""Layer claims under two lenses, each against a random-init null (docs/evidence.md "Controls").

A study that names a layer ("the decision is made at L2") reads each prompt's last token at every
lens point -- ``embed`` (the embeddings) and ``L0`` .. ``L{n-1}`` (``Lk`` = the residual stream
after block k, ``blocks.k.hook_resid_post``; the last one is the model's output) -- through

- the logit lens (`lens.logit_lens`: the model's own final path), and
- a tuned lens (Belrose et al. 2023, `fit_study_lens`) fitted in the same run on text
  sampled from the model itself (from BOS, temperature 1), never on the evaluation prompts: a
  sample holding an evaluation prompt word for word is dropped before fitting.

A study turns the lens logits into one number per point (its statistic); the claimed layer is the
first point from which the statistic reaches a floor *and* beats the largest value of the same
statistic on random-init models of the same shape (each read through its own tuned lens), at
every later point too. Beside it: how far that lens is from the output there (mean KL(output ||
lens) at the prompts' last tokens, nats), so that a claim read off a lens far from the output
can be told apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from microscope.analysis.controls import Controlled
from microscope.analysis.inputs import TextsOrIds
from microscope.analysis.lens import logit_lens
from microscope.analysis.results import round_headline, rounded
from microscope.analysis.studies.base import first_layer_from
from microscope.analysis.tuned_lens import TunedLens, fit_tuned_lens
from microscope.viz.figures import line_plot

LENSES = ("logit_lens", "tuned_lens")   # the two lenses every study reads, spelled this way everywhere


@torch.no_grad()
def model_samples(scope, n: int = 64, length: int = 47, seed: int = 0,
                  exclude: Sequence[str] = ()) -> torch.Tensor:
    """LongTensor [<= n, length + 1]: BOS then ``length`` tokens sampled from the model at
    temperature 1 (seeded; the global RNG is left as it was). Rows whose text holds one of
    ``exclude`` word for word are dropped."""
    bos = scope.tokenizer.bos_token_id
    start = torch.full((n, 1), bos, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = scope.generate(start, max_new_tokens=length, do_sample=True, top_k=0, eos_token_id=None).new_tokens
    ids = torch.cat([start, new.cpu()], 1)
    keep = [i for i, row in enumerate(ids) if not any(t in scope.tokenizer.decode(row) for t in exclude)]
    return ids[keep]


LENS_STEPS = 20   # Adam steps of a study's tuned lens, each of LENS_BATCH_TOKENS token rows
LENS_BATCH_TOKENS = 64


def fit_study_lens(scope, texts: TextsOrIds, steps: int = LENS_STEPS, seed: int = 0) -> TunedLens:
    """The tuned lens a study fits on `texts`: the least-squares start, then ``steps`` Adam steps
    of 64 token rows at lr 3e-3 (`tuned_lens.fit_tuned_lens`). On a 50k vocabulary every step
    sends 64 rows per point through the unembedding (about 2 s at opt-125m's shape on 2 cores);
    `benchmarks/lens_fit.py` measures the recipe against longer fits on the organisms.
    Gradients are on here even inside a caller's ``torch.no_grad()``."""
    with torch.enable_grad():
        return fit_tuned_lens(scope, texts, steps=steps, batch_tokens=LENS_BATCH_TOKENS, lr=3e-3, seed=seed)


def fit_sampled_lens(scope, exclude: Sequence[str] = (), seed: int = 0, steps: int = LENS_STEPS) -> TunedLens:
    """`fit_study_lens` on `model_samples` (64 x 48 tokens, none holding an ``exclude`` text)."""
    return fit_study_lens(scope, model_samples(scope, seed=seed, exclude=exclude), steps=steps, seed=seed)


@dataclass
class LastTokenLenses:
    """Both lenses at each prompt's last token.

    layers: point labels ('embed', 'L0', ...); logits: {lens: float [point, batch, vocab]};
    kl: {lens: float [point]} mean KL(output || lens), nats; output: [batch, vocab] model logits."""

    layers: list[str]
    logits: dict[str, torch.Tensor]
    kl: dict[str, torch.Tensor]
    output: torch.Tensor


def _kl_to_output(lens_logits: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    target = output.log_softmax(-1)
    return (target.exp() * (target - lens_logits.log_softmax(-1))).sum(-1).mean(-1)


def read_last_token(scope, texts: Sequence[str], seed: int = 0, lens_steps: int = LENS_STEPS) -> LastTokenLenses:
    """The logit lens and a tuned lens fitted here (`fit_sampled_lens`, excluding ``texts``,
    ``lens_steps`` Adam steps: the cost of a study on a large vocabulary) at the last token of each text."""
    texts = list(texts)
    tuned = fit_sampled_lens(scope, exclude=texts, seed=seed, steps=lens_steps)
    plain = logit_lens(scope, texts, position="last")
    translated = logit_lens(scope, texts, position="last", translate=tuned.translate)
    output = plain.model_logits[:, 0]
    logits = {"logit_lens": plain.logits[:, :, 0], "tuned_lens": translated.logits[:, :, 0]}
    return LastTokenLenses(layers=plain.layers, logits=logits, output=output,
                           kl={k: _kl_to_output(v, output) for k, v in logits.items()})


def first_clearing(values: torch.Tensor, null: torch.Tensor, floor: float) -> int | None:
    """First index from which ``values`` [point] is >= ``floor`` and clears ``null`` [draw, point]
    (`Controlled`: past its max by the margin and its prediction bound) at every later point
    (None: not at the last point)."""
    clears = [float(v) >= floor and Controlled(float(v), tuple(null[:, i].tolist()), "").clears
              for i, v in enumerate(values)]
    return first_layer_from(clears)


@dataclass
class LayerClaim:
    """A per-point statistic under one lens, its random-init null and the lens's KL to the output.

    values: [point]; null: [draw, point]; kl: [point] nats; layers: point labels; floor: the
    least value a claimed layer needs; statistic, control: what the values and the null's draws
    are (they name the control in the headline); unmet: the claim this one rests on, when that
    one does not clear (`Controlled.unmet`): then no layer is named."""

    lens: str
    layers: list[str]
    values: torch.Tensor
    null: torch.Tensor
    kl: torch.Tensor
    floor: float
    statistic: str
    control: str
    unmet: str = ""

    @property
    def index(self) -> int | None:
        return None if self.unmet else first_clearing(self.values, self.null, self.floor)

    def resting_on(self, premise: str, premise_clears: bool) -> "LayerClaim":
        """This claim, resting on the claim ``premise``: a layer is named only if that one clears."""
        return self if premise_clears else replace(self, unmet=premise)

    @property
    def name(self) -> str | None:
        return None if self.index is None else self.layers[self.index]

    def headline(self, key: str, value_key: str) -> dict:
        """``{key}_name`` (the logit lens's; ``{key}_name_tuned_lens`` for the tuned lens), the
        lens's KL to the output there, and ``value_key`` (the statistic at the claimed layer, or
        at the last point when none is claimed) with its random-init control."""
        suffix = "" if self.lens == "logit_lens" else f"_{self.lens}"
        at = len(self.layers) - 1 if self.index is None else self.index
        claim = Controlled(float(self.values[at]), tuple(self.null[:, at].tolist()),
                           control=f"{self.statistic} at {self.layers[at]}: {self.control}", unmet=self.unmet)
        return {f"{key}_name{suffix}": self.name,
                f"{key}_kl_{self.lens}": None if self.index is None else rounded(self.kl[self.index]),
                **round_headline(claim.headline(f"{value_key}{suffix}"))}

    def curves(self) -> dict[str, list[float]]:
        """Series for a line plot: the values and the null's max, by point."""
        label = self.lens.replace("_", " ")
        return {label: self.values.tolist(), f"{label}, random-init max": self.null.max(0).values.tolist()}


def kl_figure(claims: dict[str, LayerClaim]):
    """Line plot of each lens's KL to the model's output by layer (nats): how far a lens reading
    at a layer is from what the model finally says, the context for any layer claim."""
    first = next(iter(claims.values()))
    return line_plot({claim.lens.replace("_", " "): claim.kl.tolist() for claim in claims.values()},
                     x=first.layers, x_title="layer", y_title="KL(output || lens), nats",
                     title="how far each lens is from the output, by layer (last token)")
