"""Controls: the measurements that could make a claim false, computed in the same run and reported
beside it (docs/evidence.md "Controls").

    null = random_init_null(scope, lambda s: top_induction(s), seeds=range(5))
    claim = Controlled(value=top_induction(scope), null=null, control="random init x5")
    claim.clears          # value past every control value by the stated margin
    claim.headline("top_induction_score")
    # {"top_induction_score": 0.91, "top_induction_score_control": "random init x5",
    #  "top_induction_score_control_draws": 5, "top_induction_score_control_mean": 0.08,
    #  "top_induction_score_control_sd": 0.02, "top_induction_score_control_max": 0.11,
    #  "top_induction_score_control_gap_needed": 0.091, "top_induction_score_clears_control": True}
    split_controls(claim.headline("top_induction_score"))     # the reader of those keys
    # [("top_induction_score", 0.91,
    #   "random init x5: 5 draws, mean 0.08, sd 0.02, max 0.11, needs a gap of 0.091 · clears")]

A claim clears its control only by a stated margin, and only past where the null's own spread says
a further draw could land (`Controlled.threshold`): a bare greater-than would let 0.0287 "clear" a
null of 0.0279, a gap no second draw would keep, and beating the largest of n exchangeable draws
happens by luck once in n + 1 tries. The bound is the one-sided prediction bound of one more draw
of a normal null (Student's t with n - 1 degrees of freedom, ``level`` 1%): two draws give a wide
bound, so a claim on few draws must be large to clear; the draws and their spread are reported.

Nulls available here: random-initialisation models of the same architecture (`random_init_scopes`,
`random_init_null`), shuffled labels (`shuffled`), random heads other than the claimed ones
(`random_heads`), random directions of equal norm (`random_directions`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import stats
from transformers import OPTForCausalLM

from microscope.analysis.progress import Progress, counted
from microscope.errors import AnalysisInputError

DEFAULT_SEEDS = tuple(range(5))
# what `Controlled.headline` appends to a number's key; `split_controls` reads them back
CONTROL, CONTROL_MEAN, CLEARS = "_control", "_control_mean", "_clears_control"
GAP_NEEDED, CONTROL_SD, CONTROL_DRAWS = "_control_gap_needed", "_control_sd", "_control_draws"
UNMET = "_control_unmet"   # the claim this one rests on, when that one does not clear
DEFAULT_MARGIN = 0.1   # a claim must beat its control's extreme by 10% of the larger magnitude
DEFAULT_LEVEL = 0.01   # ... and lie where one more draw of the null lands less than 1% of the time
RATE_MIN_GAP = 0.1     # a rate (a share of items) must beat its control by 10 points: against a null of
                       # zeros a few coincidental hits (shuffled answers execute 6% of instructions) are no claim
CONTROL_EXTREME = {True: "_control_max", False: "_control_min"}   # by higher_is_claim


@dataclass(frozen=True)
class Controlled:
    """A measured `value` and the same measurement under a control (`null`, one value per draw).

    `higher_is_claim`: the claim is that the value is larger than the control's (False: smaller,
    e.g. a perplexity cost). `clears` when the value lies past `threshold`: beyond the control's
    extreme (not its mean) by at least `margin` times the larger of |value| and |extreme| and at
    least `min_gap` (in the metric's own units: a study states it where a relative margin means
    nothing, e.g. for values near zero), and beyond `prediction_bound`, where one more draw of the
    null would land with probability `level`. A null of one value is a fixed reference (a chance
    level): the margins alone apply.

    `unmet`: the claim this one rests on, when that one did not clear (e.g. "which component
    carries the cue's effect" rests on the cue having an effect beyond random init): then this
    one does not clear either, whatever its own numbers, and the headline says why."""

    value: float
    null: tuple[float, ...]
    control: str
    higher_is_claim: bool = True
    margin: float = DEFAULT_MARGIN
    min_gap: float = 0.0
    level: float = DEFAULT_LEVEL
    unmet: str = ""

    def __post_init__(self):
        object.__setattr__(self, "null", tuple(float(v) for v in self.null))
        if not self.null:
            raise AnalysisInputError(f"the control {self.control!r} has no values")

    @property
    def mean(self) -> float:
        return float(np.mean(self.null))

    @property
    def extreme(self) -> float:
        """The control value the claim must beat: its max (or min when lower is the claim)."""
        return max(self.null) if self.higher_is_claim else min(self.null)

    @property
    def spread(self) -> float:
        """The null's standard deviation over its draws (0 for one value)."""
        return float(np.std(self.null, ddof=1)) if len(self.null) > 1 else 0.0

    @property
    def prediction_bound(self) -> float:
        """Where one more draw of the null lands past with probability `level`: mean +- t * sd *
        sqrt(1 + 1/n), t the Student quantile with n - 1 degrees of freedom (normal null)."""
        n = len(self.null)
        if n < 2:
            return self.extreme
        reach = float(stats.t.ppf(1 - self.level, n - 1)) * self.spread * (1 + 1 / n) ** 0.5
        return self.mean + reach if self.higher_is_claim else self.mean - reach

    @property
    def gap_needed(self) -> float:
        """How far past the control's extreme the value must lie to clear it."""
        bound_past_extreme = self.prediction_bound - self.extreme if self.higher_is_claim \
            else self.extreme - self.prediction_bound     # < 0 when an outlying draw lies past the bound
        past_bound = max(bound_past_extreme, 0.0)
        return max(self.margin * max(abs(self.value), abs(self.extreme)), self.min_gap, past_bound)

    @property
    def clears(self) -> bool:
        gap = self.value - self.extreme if self.higher_is_claim else self.extreme - self.value
        return gap > self.gap_needed and not self.unmet

    def resting_on(self, premise: str, premise_clears: bool) -> "Controlled":
        """This claim, marked as resting on the claim ``premise`` (a headline key): it clears only
        if that one does."""
        return self if premise_clears else replace(self, unmet=premise)

    def sentence(self, claim: str, unit: str = "") -> str:
        """The claim in words, its control's reach and the verdict (`sentence`)."""
        return sentence(self.headline("claim"), "claim", claim, unit)

    def headline(self, key: str) -> dict[str, float | bool | str]:
        """The value with its control, as flat keys for a study's `summary()` (read back by
        `split_controls`)."""
        return {key: self.value, key + CONTROL: self.control, key + CONTROL_DRAWS: len(self.null),
                key + CONTROL_MEAN: self.mean, key + CONTROL_SD: round(self.spread, 6),
                key + CONTROL_EXTREME[self.higher_is_claim]: self.extreme,
                key + GAP_NEEDED: round(self.gap_needed, 6), key + CLEARS: self.clears,
                **({key + UNMET: self.unmet} if self.unmet else {})}


def split_controls(numbers: Mapping[str, object]) -> list[tuple[str, object, str]]:
    """(key, value, control) rows of a summary: a number written by `Controlled.headline` gets one
    row with its control described beside it ("random init x5: 5 draws, mean 0.08, sd 0.02, max
    0.11, needs a gap of 0.091 · clears");
    the control's own keys get no rows; any other number has control ""."""
    claims = [k for k in numbers if k + CONTROL in numbers]
    hidden = {k + suffix for k in claims
              for suffix in (CONTROL, CONTROL_MEAN, CLEARS, GAP_NEEDED, CONTROL_SD, CONTROL_DRAWS, UNMET,
                             *CONTROL_EXTREME.values())}
    return [(key, value, _describe(numbers, key) if key in claims else "")
            for key, value in numbers.items() if key not in hidden]


def sentence(numbers: Mapping[str, object], key: str, claim: str, unit: str = "") -> str:
    """A headline claim (keys written by `Controlled.headline`) in words, e.g. "cue head L0H2:
    zeroing it drops the insult log-odds by 3.54 nats; zero-ablating random other heads x10: up to
    0.617 nats (mean 0.321, 10 draws), so it CLEARS its control". ``claim`` ends where the value
    goes ("... by"); ``unit`` follows the numbers. The verdict reads "CLEARS its control" or "does
    NOT clear its control" (and why, when the claim rests on one that does not clear)."""
    higher = key + CONTROL_EXTREME[True] in numbers
    reach = "up to" if higher else "down to"
    n = numbers.get(key + CONTROL_DRAWS, 1)
    draws = f"mean {_number(numbers.get(key + CONTROL_MEAN))}, {n} draws" if n > 1 else "one reference value"
    verdict = "it CLEARS its control" if numbers.get(key + CLEARS) else "it does NOT clear its control"
    if numbers.get(key + UNMET):
        verdict += f" (it rests on {numbers[key + UNMET]}, which does not clear)"
    return (f"{claim} {_number(numbers[key])}{unit}; {numbers[key + CONTROL]}: {reach} "
            f"{_number(numbers.get(key + CONTROL_EXTREME[higher]))}{unit} ({draws}), so {verdict}")


def _describe(numbers: Mapping[str, object], key: str) -> str:
    higher = key + CONTROL_EXTREME[True] in numbers
    side, clears = ("max" if higher else "min"), numbers.get(key + CLEARS)
    verdict = "" if clears is None else " · clears" if clears else " · does NOT clear"
    if numbers.get(key + UNMET):
        verdict += f" (it rests on {numbers[key + UNMET]}, which does not clear)"
    gap = "" if key + GAP_NEEDED not in numbers else f", needs a gap of {_number(numbers[key + GAP_NEEDED])}"
    draws = "" if key + CONTROL_DRAWS not in numbers else f"{numbers[key + CONTROL_DRAWS]} draws, "
    sd = "" if key + CONTROL_SD not in numbers else f", sd {_number(numbers[key + CONTROL_SD])}"
    return (f"{numbers[key + CONTROL]}: {draws}mean {_number(numbers.get(key + CONTROL_MEAN))}{sd}, "
            f"{side} {_number(numbers.get(key + CONTROL_EXTREME[higher]))}{gap}{verdict}")


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def random_init_scopes(scope, seeds: Sequence[int] = DEFAULT_SEEDS, *, progress: Progress | None = None,
                       step: str = "random-init controls") -> Iterator:
    """Scopes over freshly initialised models of `scope`'s config (HF init, `torch.manual_seed(seed)`),
    same tokenizer and device, one per seed; each is built when the iterator reaches it.
    `progress` hears ``(step, models done, len(seeds))`` as the loop goes."""
    from microscope.scope import Scope
    config = scope.model.config
    device, dtype = scope.model.lm_head.weight.device, scope.model.lm_head.weight.dtype
    for seed in counted(seeds, len(seeds), step, progress):
        torch.manual_seed(seed)
        model = OPTForCausalLM(config).to(device=device, dtype=dtype).eval()
        yield Scope(model, scope.tokenizer, source=f"random init (seed {seed}) of {scope.source}")


def random_init_null(scope, measure: Callable, seeds: Sequence[int] = DEFAULT_SEEDS, *,
                     progress: Progress | None = None) -> list:
    """`measure(random_scope)` for a random-init model of `scope`'s shape per seed."""
    return [measure(s) for s in random_init_scopes(scope, seeds, progress=progress)]


def shuffled(labels: Sequence, seed: int = 0) -> list:
    """`labels` in a seeded random order (Hewitt & Liang's control task keeps the label counts)."""
    out = list(labels)
    random.Random(seed).shuffle(out)
    return out


def random_heads(n_layers: int, n_heads: int, k: int, *, exclude: Sequence[tuple[int, int]] = (),
                 seed: int = 0) -> list[tuple[int, int]]:
    """`k` distinct (layer, head) pairs drawn uniformly from the heads not in `exclude`."""
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in set(exclude)]
    if k > len(pool):
        raise AnalysisInputError(f"cannot draw {k} heads from the {len(pool)} not excluded")
    return sorted(random.Random(seed).sample(pool, k))


def random_directions(like: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """[n, d] Gaussian directions, each scaled to the norm of `like` [d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, like.numel(), generator=g)
    return (x / x.norm(dim=-1, keepdim=True) * like.float().norm()).to(like.device)
