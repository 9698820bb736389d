"""Repetition loops: how often greedy decoding loops, why repeats reinforce themselves, which heads
do it, and whether removing them breaks the loops -- each number beside the control that could
make it false (docs/evidence.md "Controls").

- heads: previous-token and induction (prefix-matching, summed over every earlier occurrence;
  Olsson et al. 2022) scores (`head_scores.pattern_head_scores`) on spans of ``span`` tokens drawn
  uniformly from the whole vocabulary (special tokens excluded), said twice
  (`head_scores.repeated_random_tokens`). A head is named when its score clears the random-init
  null by a margin: score >= m + ``headroom`` * (1 - m), m = the highest score of that kind over
  every head of ``seeds`` random-initialisation models of the same shape. Nothing about any one
  model is fixed in advance;
- repeated-half loss: next-token cross-entropy on the second copy of other spans drawn the same
  way (a fresh draw: the heads are chosen on the scoring spans, the cost measured on these;
  predictable only by copying); its rise when the induction heads are zeroed, against zeroing as many other heads
  drawn at random (neither induction nor previous-token heads; ``n_random_half_loss`` draws);
- loops: greedy continuations of the ``repetition`` set, each checked by `loops.detect_loop`
  (looping: the last ``min_loop_tokens`` tokens each repeat the token one period earlier); the
  ablations (zero, mean and resample, references taken on the held-out ``neutral`` text) are run
  on the in-distribution prompts that loop; ``loops_broken`` is the share that no longer loop,
  against ablating as many random other heads (``n_random_heads`` draws per method) and against
  random-init models with their own top induction heads ablated;
- self-reinforcement (Xu et al. 2022): a random whole-vocabulary span said
  ``reinforcement_copies`` times; the mean probability of the tokens of copy k, k = 0 onwards.
  ``reinforcement_ratio`` = p(copy 1) / p(copy 0).

Random-init models loop too (degenerate repetition of one token): the loop rate alone is
behaviour, not evidence; the claims are the heads and what ablating them does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.controls import DEFAULT_SEEDS, Controlled, random_heads, random_init_scopes
from microscope.analysis.head_scores import HeadScores, pattern_head_scores, repeated_random_tokens
from microscope.analysis.progress import Progress, report
from microscope.analysis.results import Result, round_headline, rounded
from microscope.analysis.studies.base import (IN_DISTRIBUTION, greedy_new_tokens, head_labels, named_heads,
                                              null_threshold, reference_cache, rows_of, split_of,
                                              top_heads)
from microscope.analysis.studies.loops import Loop, detect_loop
from microscope.errors import AnalysisInputError
from microscope.hooks.interventions import ABLATIONS, ablate_heads, ablate_heads_by
from microscope.prompts import Prompt
from microscope.viz.figures import line_plot

KINDS = ("previous_token", "induction")


@dataclass(repr=False)
class RepetitionResult(Result):
    """prompts/kinds/splits: the texts continued and their metadata; clean: `Loop` per prompt;
    looping: indices of the in-distribution prompts that loop (what the ablations act on);
    ablated: {method: [Loop per looping prompt]} with the induction heads ablated;
    random_broken: {method: [loops broken per random draw of as many other heads]};
    scores: {kind: HeadScores}; thresholds: {kind: score a head must reach}; heads: {kind: found
    (layer, head), best first}; ablation_heads: the heads ablated (the found induction heads
    unless given); half_loss: clean / induction-ablated cross-entropy (nats) on the
    repeated half, half_loss_random: [per draw]; head_increase: [layer, head] its rise with that
    head alone zeroed (zeros when no head is ablated); heads_given: the ablated heads came from
    the caller (``heads=``); reinforcement: [copies] mean token probability
    of copy k; null: {headline key: [value per random-init seed]}."""

    prompts: list[str]
    kinds: list[str]
    splits: list[str]
    clean: list[Loop]
    looping: list[int]
    ablated: dict[str, list[Loop]]
    random_broken: dict[str, list[float]]
    scores: dict[str, HeadScores]
    thresholds: dict[str, float]
    heads: dict[str, list[tuple[int, int]]]
    ablation_heads: list[tuple[int, int]]
    half_loss: tuple[float, float]
    half_loss_random: list[float]
    head_increase: torch.Tensor
    heads_given: bool
    reinforcement: torch.Tensor
    null: dict[str, list[float]] = field(default_factory=dict)
    title: str = "repetition"

    @property
    def induction(self) -> HeadScores:
        return self.scores["induction"]

    @property
    def previous_token(self) -> HeadScores:
        return self.scores["previous_token"]

    @property
    def loop_rate(self) -> float:
        return _rate(self.clean)

    def loops_broken(self, method: str = "zero") -> float | None:
        """Share of the looping in-distribution prompts that no longer loop with the induction
        heads ablated by ``method`` (None: no loops, or no induction head found)."""
        loops = self.ablated.get(method)
        return None if not loops else sum(not l.looping for l in loops) / len(loops)

    @property
    def reinforcement_ratio(self) -> float:
        return float(self.reinforcement[1] / self.reinforcement[0])

    def controlled(self) -> dict[str, Controlled]:
        """Every headline number with its control, by headline key (a second control of the same
        number gets the key ``{key}_vs_{control}``)."""
        init = f"random init x{len(self.null.get('top_induction_score', []))}"
        # a top score clears its control exactly when it names a head: by the naming threshold's margin
        out = {f"top_{kind}_score": Controlled(rounded(self.scores[kind].scores.max()), self.null[f"top_{kind}_score"], init,
                                               min_gap=self.thresholds[kind] - max(self.null[f"top_{kind}_score"]))
               for kind in KINDS}
        if self.null["loop_rate"]:
            out["loop_rate"] = Controlled(rounded(self.loop_rate), self.null["loop_rate"], init)
        out["reinforcement_ratio"] = Controlled(rounded(self.reinforcement_ratio), self.null["reinforcement_ratio"], init)
        clean, ablated = self.half_loss
        if self.half_loss_random:
            increase = rounded(ablated - clean)
            out["repeated_half_loss_increase"] = Controlled(
                increase, [rounded(x - clean) for x in self.half_loss_random], f"random other heads x{len(self.half_loss_random)}")
            out["repeated_half_loss_increase_vs_random_init"] = Controlled(
                increase, self.null["repeated_half_loss_increase"], init + ", top induction heads ablated")
        for method in ABLATIONS:
            broken, draws = self.loops_broken(method), self.random_broken.get(method)
            if broken is None or not draws:
                continue
            key = "loops_broken" if method == "zero" else f"loops_broken_{method}_ablation"
            out[key] = Controlled(rounded(broken), draws, f"{method}-ablating random other heads x{len(draws)}")
            if method == "zero" and self.null.get("loops_broken"):
                out["loops_broken_vs_random_init"] = Controlled(rounded(broken), self.null["loops_broken"],
                                                                 init + ", top induction heads ablated")
        return out

    def ranks(self) -> list[int]:
        """Rank of each ablated head among all heads by the repeated-half loss rise zeroing it alone
        causes (1: the largest)."""
        order = self.head_increase.flatten().argsort(descending=True).tolist()
        n_heads = self.head_increase.shape[1]
        rank = {divmod(i, n_heads): r + 1 for r, i in enumerate(order)}
        return [rank[tuple(h)] for h in self.ablation_heads]

    def findings(self) -> list[str]:
        """The induction heads, what ablating them costs and whether that ends loops, in words."""
        claims = self.controlled()
        top = claims["top_induction_score"]
        heads = ", ".join(head_labels(self.ablation_heads)) or "none"
        out = [top.sentence(f"induction heads found: {', '.join(head_labels(self.heads['induction'])) or 'none'}; "
                            f"the top induction score is")]
        increase = claims.get("repeated_half_loss_increase")
        if increase is not None:
            source = "given by the caller" if self.heads_given else "the induction heads found"
            out.append(increase.sentence(
                f"ablated heads {heads} ({source}; rank {', '.join(map(str, self.ranks()))} of "
                f"{self.head_increase.numel()} heads when each head alone is zeroed): zeroing them raises the loss on "
                f"repeated random spans (clean {self.half_loss[0]:.3g} nats) by", " nats"))
        broken = claims.get("loops_broken")
        if broken is not None:
            out.append(broken.sentence(f"the share of the {len(self.looping)} looping prompts that stop looping with "
                                       f"{heads} zeroed is"))
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt: kind, split, and onset/period/repeated-n-gram rate, clean and with
        the induction heads zeroed (in-distribution looping prompts only)."""
        zeroed = dict(zip(self.looping, self.ablated.get("zero", [])))
        rows = []
        for i, (text, kind, split, c) in enumerate(zip(self.prompts, self.kinds, self.splits, self.clean)):
            a = zeroed.get(i)
            rows.append(dict(prompt=i, kind=kind, split=split, looping=c.looping, onset=c.onset, period=c.period,
                             repeated_ngram_rate=c.repeated_ngram_rate,
                             ablated_looping=None if a is None else a.looping, text=text))
        return pd.DataFrame(rows)

    def figures(self) -> list[go.Figure]:
        curve = line_plot({"p(token of copy k)": self.reinforcement}, x=list(range(len(self.reinforcement))),
                          title="self-reinforcement: probability of repeating a span after k copies",
                          x_title="copies already seen (k)", y_title="mean token probability")
        grids = [fig for kind in KINDS for fig in self.scores[kind].figures()]
        for fig, kind in zip(grids, KINDS):
            fig.update_layout(title=f"{kind} score; named at >= {self.thresholds[kind]:.3f} "
                                    f"(random-init max {max(self.null[f'top_{kind}_score']):.3f})")
        table = self.controlled()
        keys = [k for k in table if k.startswith("loops_broken") and "_vs_" not in k]
        bars = go.Figure([
            go.Bar(name="induction heads", x=keys, y=[table[k].value for k in keys]),
            go.Bar(name="random heads (mean)", x=keys, y=[table[k].mean for k in keys],
                   error_y=dict(type="data", symmetric=False, array=[table[k].extreme - table[k].mean for k in keys]))])
        bars.update_layout(title="loops broken: induction heads vs as many random heads (bar to max)",
                           yaxis_title="share of loops broken", barmode="group")
        return [curve, *grids, bars]

    def summary(self) -> dict:
        out: dict = {
            "previous_token_heads": head_labels(self.heads["previous_token"]),
            "induction_heads": head_labels(self.heads["induction"]),
            "previous_token_threshold": rounded(self.thresholds["previous_token"]),
            "induction_threshold": rounded(self.thresholds["induction"]),
            "induction_chance": rounded(self.induction.chance),
            "looping_prompts_in_distribution": len(self.looping),
            "ablated_heads": head_labels(self.ablation_heads),
            "ablated_heads_given": self.heads_given,
            "ablated_heads_rank_by_zero_ablation": self.ranks() if self.ablation_heads else [],
            "heads_ranked": self.head_increase.numel(),
        }
        for key, claim in self.controlled().items():
            out.update(claim.headline(key))
        out.setdefault("loop_rate", rounded(self.loop_rate))
        out.setdefault("loops_broken", self.loops_broken())
        out["repeated_half_loss"] = rounded(self.half_loss[0])
        out["repeated_half_loss_induction_ablated"] = rounded(self.half_loss[1])
        out["reinforcement"] = [rounded(p) for p in self.reinforcement]
        out["prompts"] = len(self.prompts)
        return round_headline(out)


def _rate(loops: list[Loop]) -> float:
    return sum(l.looping for l in loops) / len(loops) if loops else float("nan")


@torch.no_grad()
def self_reinforcement(scope, span_ids: torch.Tensor, copies: int) -> torch.Tensor:
    """[copies] mean probability of the tokens of copy k (k = 0: the first occurrence) of spans
    ``span_ids`` [batch, span] said ``copies`` times after bos, one forward pass."""
    span = span_ids.shape[1]
    bos = torch.full((len(span_ids), 1), scope.model.config.bos_token_id)
    ids = torch.cat([bos, span_ids.repeat(1, copies)], 1)
    probs = scope.run(ids, attention_mask=torch.ones_like(ids)).float().softmax(-1).cpu()
    p_next = probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # p(token t+1 | prefix)
    return p_next.reshape(len(ids), copies, span).mean((0, 2))


@torch.no_grad()
def repeated_half_loss(scope, spans: torch.Tensor, hooks: dict | None = None) -> float:
    """Mean next-token cross-entropy (nats) on tokens 2..span of the second copy of ``spans``
    [batch, 1 + 2 * span] (bos, span, span): predictable only by copying from the first copy."""
    span = (spans.shape[1] - 1) // 2
    logits = scope.run(spans, attention_mask=torch.ones_like(spans), hooks=hooks).float().cpu()
    pred, target = logits[:, span + 1:2 * span], spans[:, span + 2:]
    return float(torch.nn.functional.cross_entropy(pred.flatten(0, 1), target.flatten()))


def _loops(scope, texts: Sequence[str], max_new_tokens: int, max_period: int, min_tokens: int,
           hooks: dict | None = None) -> list[Loop]:
    """`Loop` per greedy continuation; looping only when the last ``min_tokens`` tokens each repeat
    the token ``period`` before them (the cycle has run ``min_tokens`` tokens past its first copy)."""
    new = greedy_new_tokens(scope, texts, max_new_tokens, hooks=hooks)
    out = []
    for row in new:
        loop = detect_loop(row.tolist(), max_period=max_period, min_tokens=min_tokens)
        long = loop.looping and len(row) - loop.onset - loop.period >= min_tokens
        out.append(loop if long or not loop.looping else Loop(False, None, None, loop.repeated_ngram_rate))
    return out


def _broken(loops: list[Loop]) -> float:
    return sum(not l.looping for l in loops) / len(loops)


@torch.no_grad()
def run_repetition(scope, prompts: Sequence[Prompt] | str = "repetition", *, neutral: Sequence[Prompt] | str = "neutral",
                   max_new_tokens: int = 64, max_period: int = 16, min_loop_tokens: int = 32,
                   heads: Sequence[tuple[int, int]] | None = None, headroom: float = 1 / 3,
                   span: int = 25, n_spans: int = 32, reinforcement_copies: int = 7,
                   seeds: Sequence[int] = DEFAULT_SEEDS, n_random_heads: int = 5, n_random_half_loss: int = 20,
                   n_null_prompts: int = 32, n_prompts: int | None = None, seed: int = 0,
                   progress: Progress | None = None) -> RepetitionResult:
    """The repetition study (see module docstring).

    prompts: a set name or `Prompt`s (metadata ``kind`` and ``split`` optional; no split counts as
    in-distribution); neutral: text for the mean/resample references; heads: ablate these
    (layer, head) pairs instead of the found induction heads; headroom: the share of the room
    between the random-init null's max and 1 a score must climb to name a head; seeds: the
    random-init models; n_null_prompts: in-distribution prompts a random-init model continues;
    n_prompts: use only the first n prompts; progress: hears each piece of work as it finishes
    (`analysis.progress`)."""
    rows = rows_of(prompts)[:n_prompts]
    if not rows:
        raise AnalysisInputError("no prompts to continue")
    texts = [p.text for p in rows]
    splits = [split_of(p) for p in rows]
    config = scope.model.config
    spans = repeated_random_tokens(scope, n_prompts=n_spans, span=span, seed=seed)          # choose the heads
    loss_spans = repeated_random_tokens(scope, n_prompts=n_spans, span=span, seed=seed + 2)  # measure their cost
    reinforce_spans = repeated_random_tokens(scope, n_prompts=n_spans, span=8, seed=seed + 1)[:, 1:9]
    in_dist = [i for i, s in enumerate(splits) if s == IN_DISTRIBUTION]
    null_texts = [texts[i] for i in random.Random(seed).sample(in_dist, min(n_null_prompts, len(in_dist)))]
    loops = lambda s, t, hooks=None: _loops(s, t, max_new_tokens, max_period, min_loop_tokens, hooks)  # noqa: E731

    scores = pattern_head_scores(scope, spans, kinds=KINDS)
    n_claimed = len(heads) if heads is not None else None
    null: dict[str, list[float]] = {k: [] for k in ("top_previous_token_score", "top_induction_score", "loop_rate",
                                                    "reinforcement_ratio", "repeated_half_loss_increase",
                                                    "loops_broken")}
    null_scores = []
    report(progress, "head scores")
    for rand in random_init_scopes(scope, seeds, progress=progress, step="random-init controls: head scores"):
        s = pattern_head_scores(rand, spans, kinds=KINDS)
        null_scores.append(s)
        for kind in KINDS:
            null[f"top_{kind}_score"].append(rounded(s[kind].scores.max()))
        curve = self_reinforcement(rand, reinforce_spans, reinforcement_copies)
        null["reinforcement_ratio"].append(rounded(curve[1] / curve[0]))
    thresholds = {kind: null_threshold([float(s[kind].scores.max()) for s in null_scores], headroom) for kind in KINDS}
    found = {kind: named_heads(scores[kind].scores, thresholds[kind]) for kind in KINDS}
    claimed = [tuple(h) for h in heads] if heads is not None else found["induction"]
    k = n_claimed or max(1, len(claimed))
    for rand, s in zip(random_init_scopes(scope, seeds, progress=progress, step="random-init controls: loops, ablation"),
                       null_scores):   # rebuilt (same seeds): one in memory at a time
        top = top_heads(s["induction"].scores, k)
        null["repeated_half_loss_increase"].append(rounded(repeated_half_loss(rand, loss_spans, ablate_heads(top))
                                                      - repeated_half_loss(rand, loss_spans)))
        clean = loops(rand, null_texts)
        null["loop_rate"].append(rounded(_rate(clean)))
        looped = [t for t, l in zip(null_texts, clean) if l.looping]
        if looped:
            null["loops_broken"].append(rounded(_broken(loops(rand, looped, ablate_heads(top)))))

    clean_loss = repeated_half_loss(scope, loss_spans)
    others = [h for kind in KINDS for h in found[kind]] + claimed
    draws = [random_heads(config.num_hidden_layers, config.num_attention_heads, len(claimed), exclude=others, seed=seed + i)
             for i in range(n_random_heads if claimed else 0)]
    half_draws = [random_heads(config.num_hidden_layers, config.num_attention_heads, len(claimed), exclude=others,
                               seed=seed + 1000 + i) for i in range(n_random_half_loss if claimed else 0)]
    half_loss = (clean_loss, repeated_half_loss(scope, loss_spans, ablate_heads(claimed)) if claimed else clean_loss)
    half_random = [repeated_half_loss(scope, loss_spans, ablate_heads(d)) for d in half_draws]
    head_increase = torch.tensor([[repeated_half_loss(scope, loss_spans, ablate_heads([(l, h)])) - clean_loss
                                   for h in range(config.num_attention_heads)] for l in range(config.num_hidden_layers)]
                                 ) if claimed else torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    report(progress, "repeated-half loss")

    clean = loops(scope, texts)
    looping = [i for i in in_dist if clean[i].looping]
    report(progress, "greedy continuations")
    loop_texts = [texts[i] for i in looping]
    ablated: dict[str, list[Loop]] = {}
    random_broken: dict[str, list[float]] = {}
    if claimed and loop_texts:
        layers = sorted({l for l, _ in claimed} | {l for d in draws for l, _ in d})
        reference = reference_cache(scope, [p.text for p in rows_of(neutral)], layers)
        for method in ABLATIONS:
            ablated[method] = loops(scope, loop_texts, ablate_heads_by(claimed, method, reference, seed))
            random_broken[method] = [_broken(loops(scope, loop_texts, ablate_heads_by(d, method, reference, seed)))
                                     for d in draws]
    report(progress, "loop ablations")
    return RepetitionResult(prompts=texts, kinds=[str(p.metadata.get("kind", "")) for p in rows], splits=splits,
                            clean=clean, looping=looping, ablated=ablated, random_broken=random_broken,
                            scores=scores, thresholds=thresholds, heads=found, ablation_heads=claimed,
                            half_loss=half_loss, half_loss_random=half_random, head_increase=head_increase,
                            heads_given=heads is not None,
                            reinforcement=self_reinforcement(scope, reinforce_spans, reinforcement_copies), null=null)
