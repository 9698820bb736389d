"""Toxic generation: where the model tells a hostile context from a friendly one, which heads carry
the cue, the direction that holds the register, and how far steering against it goes -- each
number beside the control that could make it false (docs/evidence.md "Controls").

Prompts: hostile/friendly pairs that differ only in the cue (metadata ``label``, ``pair``,
``split``; of any token lengths: a pair is aligned at its last token), ending where the next word
is an insult or a praise. In-distribution
pairs are split by pair parity: even pairs *fit* (steering direction, cue-head search, tuned lens),
odd pairs *evaluate*. Held-out ``neutral`` text: its first half fits the tuned lens and is the
reference of mean/resample ablations, its second half measures perplexity. The metric throughout
is the insult-vs-praise log-odds at the last token, ``log P(insults) - log P(praises)`` (a logit
difference between the two word classes).

- probes (Hewitt & Liang 2019): a linear probe (`probes.train_probes`, ridge: least squares on
  +-1 labels, standardised features, L2 strength ``probe_ridge`` per training example) on the
  last-token residual at each lens point of the in-distribution prompts (pairs split by parity); selectivity =
  accuracy - accuracy on shuffled labels (``n_shuffles``; the accuracy claim rests on the
  selectivity's: random features read token identity too); the probe layer is the first point
  whose selectivity clears the random-init null's max m at that point by ``headroom`` of the room
  to the best selectivity (m + headroom * (1 - chance - m)): a margin, so that one more random
  model, one draw among many layers, does not clear it by luck;
- where the register is read, under the logit lens and a tuned lens fitted in the same run
  (`layers.fit_study_lens`): the hostile-minus-friendly gap of the lens log-odds on the
  evaluation pairs per point; the read layer is the first point from which the gap stays at least
  half the output's gap (None when the output's gap does not clear its random-init control: a
  layer that reads an effect the model does not have is noise). The lenses' KL to the output on
  held-out text is kept beside;
- cue heads: activation patching of each head's output (``attn.hook_z``, every position) from
  the hostile into the friendly prompt of each fit pair: the share of the model's log-odds gap it
  restores (of one nat when the model shows no gap). The ``exact_heads`` heads of largest
  attribution-patching estimate are patched one by one, the rest keep their estimate (every head
  of the organism; 16 of opt-125m's 144, the same rule for every random-init model). A head is named when the output's gap
  clears its random-init control (no cue heads for a cue without effect) and its share clears the
  random-init null (the largest effect of any head of ``seeds`` random-init models, in units of the
  same gap) by ``headroom`` of the room to 1. Then the claim that they
  matter: zero, mean and resample ablation of the cue heads on the evaluation hostile prompts
  (drop of the log-odds), against as many random other heads and random-init models' own top
  heads;
- the hostile direction: mean hostile minus mean friendly residual of the fit pairs at the probe
  layer (without one, at the most selective block output); its vocabulary projection at that
  layer under both lenses (share of insult words among the top 10) against
  ``n_random_directions`` random directions of equal norm;
- steering: ``-s * direction`` added at every position. The strength is chosen on the fit pairs
  (the smallest that halves their insult-word rate), then measured on the evaluation pairs:
  insult-word rate of greedy continuations, log-odds drop, and perplexity on the neutral
  evaluation half, each against random directions of equal norm at the same strength.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from threadpoolctl import threadpool_limits

from microscope.analysis.controls import (DEFAULT_SEEDS, Controlled, random_directions, random_heads,
                                          random_init_scopes, shuffled)
from microscope.analysis.attribution_patching import screened, site_gradients
from microscope.analysis.inputs import (distinct_word_classes, end_aligned, last_positions, last_token_logits, task_value,
                                        token_batch, where_present)
from microscope.analysis.lens import logit_lens, point_label, residual_points, vocab_projection
from microscope.analysis.probes import live_features, train_probes
from microscope.analysis.results import Result, round_headline, rounded
from microscope.analysis.steering import SteeringVector, mean_difference_vector
from microscope.analysis.progress import Progress, report
from microscope.analysis.studies.base import (IN_DISTRIBUTION, first_layer_from, greedy_new_tokens, head_labels,
                                              named_heads, null_threshold, reference_cache, rows_of, split_of,
                                              split_suffix, top_heads)
from microscope.analysis.studies.layers import LENS_STEPS, LENSES, fit_study_lens
from microscope.analysis.tuned_lens import LensComparison, TunedLens, compare_lenses
from microscope.errors import AnalysisInputError
from microscope.hooks.cache import ActivationCache
from microscope.hooks.interventions import ABLATIONS, ablate_heads, ablate_heads_by, add_vector, patch_from
from microscope.names import act_name
from microscope.prompts import Prompt
from microscope.viz.figures import head_grid, line_plot

DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
EXACT_HEADS = 16   # heads patched one by one per model; the rest keep their attribution estimate
LABELS = ("hostile", "friendly", "none")
CHOSEN_ON = ("fit pairs (even): the cue heads (patching), the hostile direction, the steering strength, the tuned "
             "lens; every claim is measured on the evaluation pairs (odd), which chose nothing")   # a pair's two prompts, and the same prompt without its cue


@dataclass(repr=False)
class ToxicityResult(Result):
    """points/layers: lens points (hook names) and their labels ('embed', 'L0', ...);
    accuracy/shuffled_accuracy: [point] probe accuracy on real / shuffled labels;
    null_selectivity: [seed, point] the random-init models' selectivity; probe_bar: [point] the
    selectivity the probe layer must reach; probe_layer: index into
    points or None; lens_gap: {lens: [point] hostile - friendly log-odds gap}; lens_kl: KL of both
    lenses to the output on held-out text; read_layer: {lens: index or None};
    patch: [layer, head] share of the log-odds gap restored by patching the head; cue_null: [seed]
    largest |effect| of a random-init model's head, in units of this model's gap; cue_threshold, cue_heads
    (given by the caller when heads_given); head_drops: [layer, head] log-odds drop with that head
    alone zeroed (zeros when no cue head is named); cue_drop: {method: log-odds
    drop, cue heads ablated}; cue_drop_random: {method: [drop per random draw]};
    direction: the steering vector; top_tokens/insult_share: {lens: frame / share of insults in
    the top 10}; insult_share_random: {lens: [per random direction]}; sweep: frame (strength,
    fit_insult_rate, insult_rate, log_odds, perplexity); strength: the chosen one;
    steer_random: frame (insult_rate, log_odds, perplexity) per random direction at that strength;
    insult_prob: {split: (hostile, friendly)} next-token insult mass; insult_prob_no_cue: {split:
    the same after each pair's prompt without its cue (label ``none``), where the set has them};
    pairs: (fit, evaluation) in-distribution pairs; null: {key: [per seed]}."""

    points: list[str]
    layers: list[str]
    accuracy: np.ndarray
    shuffled_accuracy: np.ndarray
    chance: float
    null_selectivity: np.ndarray
    probe_bar: list[float]
    probe_layer: int | None
    lens_gap: dict[str, torch.Tensor]
    lens_kl: LensComparison
    read_layer: dict[str, int | None]
    patch: torch.Tensor
    cue_null: list[float]
    cue_threshold: float
    cue_heads: list[tuple[int, int]]
    heads_given: bool
    head_drops: torch.Tensor
    cue_drop: dict[str, float]
    cue_drop_random: dict[str, list[float]]
    direction: SteeringVector
    top_tokens: dict[str, pd.DataFrame]
    insult_share: dict[str, float]
    insult_share_random: dict[str, list[float]]
    sweep: pd.DataFrame
    strength: float
    steer_random: pd.DataFrame
    insult_prob: dict[str, tuple[float, float]]
    insult_prob_no_cue: dict[str, float] = field(default_factory=dict)
    pairs: tuple[int, int] = (0, 0)
    null: dict[str, list[float]] = field(default_factory=dict)
    title: str = "toxicity"

    @property
    def selectivity(self) -> np.ndarray:
        return self.accuracy - self.shuffled_accuracy

    def _ranks(self) -> dict:
        """Where the cue heads rank among all heads by the drop zeroing each alone causes (1: the
        largest), the five largest, and the cue heads' drop as a share of the output's log-odds gap
        (the metric's range)."""
        if not self.cue_heads:
            return {}
        flat = self.head_drops.flatten()
        order = flat.argsort(descending=True).tolist()
        n_heads = self.head_drops.shape[1]
        rank = {divmod(i, n_heads): r + 1 for r, i in enumerate(order)}
        gap = float(self.lens_gap["logit_lens"][-1])
        return {"cue_heads_rank_by_zero_ablation": [rank[h] for h in self.cue_heads],
                "heads_ranked": len(order),
                "top_heads_by_zero_ablation": {head_labels([divmod(i, n_heads)])[0]: rounded(flat[i]) for i in order[:5]},
                "cue_heads_log_odds_drop_share_of_gap": rounded(self.cue_drop["zero"] / gap) if gap and "zero" in self.cue_drop else None}

    def _steered(self) -> tuple[pd.Series, pd.Series]:
        return self.sweep.iloc[0], self.sweep[self.sweep["strength"] == self.strength].iloc[0]

    def controlled(self) -> dict[str, Controlled]:
        """Every headline number with its control, by headline key (a second control of the same
        number gets the key ``{key}_vs_{control}``)."""
        init = f"random init x{len(self.null_selectivity)}"
        n_dir = f"random directions of equal norm x{len(self.steer_random)}"
        out: dict[str, Controlled] = {}
        ratio = self.insult_prob[IN_DISTRIBUTION][0] / self.insult_prob[IN_DISTRIBUTION][1]
        out["insult_prob_ratio"] = Controlled(rounded(ratio), self.null["insult_prob_ratio"], init)
        layer = self.probe_layer if self.probe_layer is not None else int(np.argmax(self.selectivity))
        out["probe_selectivity"] = Controlled(rounded(self.selectivity[layer]), [rounded(x) for x in self.null_selectivity[:, layer]],
                                              init + f" at {self.layers[layer]}")
        out["probe_accuracy"] = Controlled(rounded(self.accuracy[layer]), [rounded(self.shuffled_accuracy[layer])],
                                           f"shuffled labels at {self.layers[layer]}"
                                           ).resting_on("probe_selectivity", out["probe_selectivity"].clears)
        out["output_log_odds_gap"] = Controlled(rounded(self.lens_gap["logit_lens"][-1]), self.null["output_log_odds_gap"], init)
        for method in ABLATIONS:
            if method in self.cue_drop and self.cue_drop_random.get(method):
                key = "cue_heads_log_odds_drop" if method == "zero" else f"cue_heads_log_odds_drop_{method}_ablation"
                out[key] = Controlled(rounded(self.cue_drop[method]), self.cue_drop_random[method],
                                      f"{method}-ablating random other heads x{len(self.cue_drop_random[method])}")
        if "zero" in self.cue_drop and self.null.get("cue_heads_log_odds_drop"):
            out["cue_heads_log_odds_drop_vs_random_init"] = Controlled(
                rounded(self.cue_drop["zero"]), self.null["cue_heads_log_odds_drop"], init + ", top patching heads ablated")
        for lens in LENSES:
            out[f"direction_insult_share_{lens}"] = Controlled(self.insult_share[lens], self.insult_share_random[lens], n_dir)
        base, steered = self._steered()
        cut = lambda rate: rounded(1 - rate / base["insult_rate"]) if base["insult_rate"] > 0 else 0.0  # noqa: E731
        out["insult_rate_cut"] = Controlled(cut(steered["insult_rate"]), [cut(x) for x in self.steer_random["insult_rate"]], n_dir)
        drop = rounded(base["log_odds"] - steered["log_odds"])
        out["log_odds_drop_steered"] = Controlled(drop, [rounded(base["log_odds"] - x) for x in self.steer_random["log_odds"]], n_dir)
        out["log_odds_drop_steered_vs_random_init"] = Controlled(drop, self.null["log_odds_drop_steered"], init)
        cost = lambda ppl: rounded(ppl / base["perplexity"] - 1)  # noqa: E731
        out["perplexity_cost"] = Controlled(cost(steered["perplexity"]), [cost(x) for x in self.steer_random["perplexity"]],
                                            n_dir + " (claim: a smaller cost)", higher_is_claim=False)
        return out

    def findings(self) -> list[str]:
        """The register, the cue heads, the probe and the steering, each in words with its verdict."""
        claims = self.controlled()
        hostile, friendly = self.insult_prob[IN_DISTRIBUTION]
        no_cue = self.insult_prob_no_cue.get(IN_DISTRIBUTION)
        baseline = "" if no_cue is None else f", {no_cue:.3g} with no cue"
        out = [claims["output_log_odds_gap"].sentence(
            f"hostile register: the next word is an insult with probability {hostile:.3g} after a hostile cue and "
            f"{friendly:.3g} after a friendly one{baseline}; the hostile-minus-friendly insult log-odds gap is", " nats")]
        drop = claims.get("cue_heads_log_odds_drop")
        if self.cue_heads and drop is not None:
            ranks = self._ranks()
            source = "given by the caller" if self.heads_given else "named by activation patching"
            out.append(drop.sentence(
                f"cue heads {', '.join(head_labels(self.cue_heads))} ({source}; rank "
                f"{', '.join(map(str, ranks['cue_heads_rank_by_zero_ablation']))} of {ranks['heads_ranked']} heads when "
                f"each head alone is zeroed): zeroing them drops the hostile insult log-odds "
                f"({ranks['cue_heads_log_odds_drop_share_of_gap']} of the gap) by", " nats"))
        else:
            out.append("no cue head is named: a head is named only when the register clears random init and its "
                       "patching share clears the random-init heads' largest")
        layer = self.probe_layer if self.probe_layer is not None else int(np.argmax(self.selectivity))
        out.append(claims["probe_selectivity"].sentence(
            f"a linear probe at {self.layers[layer]} tells hostile from friendly with selectivity (accuracy "
            f"{self.accuracy[layer]:.3g} minus shuffled labels)"))
        out.append(claims["log_odds_drop_steered"].sentence(
            f"steering against the hostile direction (strength {self.strength:g}, {self.direction.hook}) lowers the "
            f"insult log-odds by", " nats"))
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per lens point: probe accuracy, shuffled-label accuracy, selectivity and its
        random-init null, the log-odds gap under both lenses, the lenses' KL to the output."""
        return pd.DataFrame(dict(point=self.points, layer=self.layers, probe_accuracy=self.accuracy,
                                 shuffled_label_accuracy=self.shuffled_accuracy, selectivity=self.selectivity,
                                 selectivity_random_init_mean=self.null_selectivity.mean(0),
                                 selectivity_random_init_max=self.null_selectivity.max(0),
                                 probe_layer=[i == self.probe_layer for i in range(len(self.points))],
                                 logit_lens_gap=self.lens_gap["logit_lens"].tolist(), tuned_lens_gap=self.lens_gap["tuned_lens"].tolist(),
                                 logit_lens_kl=self.lens_kl.logit_kl.tolist(), tuned_lens_kl=self.lens_kl.tuned_kl.tolist()))

    def figures(self) -> list[go.Figure]:
        probe = line_plot({"selectivity": self.selectivity, "random-init max": self.null_selectivity.max(0),
                           "random-init mean": self.null_selectivity.mean(0)}, x=self.layers,
                          title="hostile vs friendly: probe selectivity (accuracy - shuffled labels) by layer",
                          x_title="layer", y_title="selectivity")
        lens = line_plot({name.replace("_", " "): self.lens_gap[name] for name in LENSES}, x=self.layers,
                         title="where the register is read: hostile - friendly insult log-odds by layer",
                         x_title="layer", y_title="log-odds gap (nats)")
        heads = head_grid(self.patch, title=f"share of the log-odds gap restored by patching a head "
                                            f"(cue heads >= {self.cue_threshold:.2f})", colorbar="share")
        sweep = go.Figure([go.Scatter(x=self.sweep["perplexity"], y=self.sweep["insult_rate"], mode="lines+markers+text",
                                      text=[f"s={s:g}" for s in self.sweep["strength"]], textposition="top center",
                                      name="hostile direction"),
                           go.Scatter(x=self.steer_random["perplexity"], y=self.steer_random["insult_rate"], mode="markers",
                                      name=f"random directions (s={self.strength:g})")])
        sweep.update_layout(title="steering against the hostile direction (held-out pairs; perplexity on neutral text)",
                            xaxis_title="perplexity on held-out neutral text", yaxis_title="insult-word rate")
        return [probe, lens, self.lens_kl.figures()[0], heads, sweep]

    def summary(self) -> dict:
        base, steered = self._steered()
        out: dict = {
            "chosen_on": CHOSEN_ON, "fit_pairs": self.pairs[0], "evaluation_pairs": self.pairs[1],
            "probe_layer": self.probe_layer,
            "probe_layer_name": None if self.probe_layer is None else self.layers[self.probe_layer],
            "probe_layer_hook": None if self.probe_layer is None else self.points[self.probe_layer],
            "probe_selectivity_by_layer": [rounded(x) for x in self.selectivity],
            "probe_selectivity_bar_by_layer": [rounded(x) for x in self.probe_bar],
            "probe_accuracy_by_layer": [rounded(x) for x in self.accuracy],
            "probe_chance": rounded(self.chance),
            "read_layer_logit_lens": _label(self.layers, self.read_layer["logit_lens"]),
            "read_layer_tuned_lens": _label(self.layers, self.read_layer["tuned_lens"]),
            "lens_log_odds_gap_logit_by_layer": [rounded(x) for x in self.lens_gap["logit_lens"]],
            "lens_log_odds_gap_tuned_by_layer": [rounded(x) for x in self.lens_gap["tuned_lens"]],
            **{k: rounded(v) for k, v in self.lens_kl.summary().items()},
            "cue_heads": head_labels(self.cue_heads),
            "cue_heads_given": self.heads_given,
            **self._ranks(),
            "cue_threshold": rounded(self.cue_threshold),
            "cue_patch_top_share": rounded(self.patch.max()),
            "cue_patch_random_init_max": rounded(max(self.cue_null)),
        }
        for split, (hostile, friendly) in self.insult_prob.items():
            out[f"insult_prob_hostile{split_suffix(split)}"] = hostile
            out[f"insult_prob_friendly{split_suffix(split)}"] = friendly
            out[f"insult_prob_no_cue{split_suffix(split)}"] = self.insult_prob_no_cue.get(split)
        for key, claim in self.controlled().items():
            out.update(claim.headline(key))
        out.update(direction_hook=self.direction.hook, direction_top_tokens=self.top_tokens["logit_lens"]["promoted"].str.strip().tolist(),
                   steering_strength=self.strength, insult_rate_unsteered=rounded(base["insult_rate"]),
                   insult_rate_steered=rounded(steered["insult_rate"]), perplexity_unsteered=rounded(base["perplexity"]))
        return round_headline(out)


def _label(layers: list[str], index: int | None) -> str | None:
    return None if index is None else layers[index]


def _log_odds(last: torch.Tensor, insult_ids: torch.Tensor, praise_ids: torch.Tensor) -> torch.Tensor:
    """[batch] log P(insults) - log P(praises) from the logits at each row's last token [batch, vocab]."""
    x = last.float()
    return x[:, insult_ids].logsumexp(-1) - x[:, praise_ids].logsumexp(-1)


def _insult_mass(scope, batch: "_Batch", insult_ids: torch.Tensor) -> float:
    """Mean next-token probability of the insult class (its words' first tokens) after ``batch``."""
    everything = torch.arange(scope.model.config.vocab_size)
    return float(batch.log_odds(scope, (insult_ids, everything)).exp().mean())


@dataclass
class _Batch:
    """Token ids [batch, pos] and mask of some prompts."""

    ids: torch.Tensor
    mask: torch.Tensor

    def log_odds(self, scope, words: tuple[torch.Tensor, torch.Tensor], hooks: dict | None = None) -> torch.Tensor:
        return _log_odds(last_token_logits(scope, self.ids, self.mask, hooks).cpu(), *words)

    def metric(self, words: tuple[torch.Tensor, torch.Tensor]):
        """logits [batch, pos, vocab] -> the mean log-odds at each row's last token (a scalar to
        differentiate)."""
        rows, last = torch.arange(len(self.ids)), last_positions(self.mask)
        return lambda logits: _log_odds(logits[rows.to(logits.device), last.to(logits.device)],
                                        *(w.to(logits.device) for w in words)).mean()


def _pairs(scope, hostile: list[str], friendly: list[str]) -> tuple[_Batch, _Batch]:
    """Hostile and friendly batches of the same shape, left padded so that each pair meets at its
    last token (`inputs.end_aligned`: the two may differ in token length)."""
    h_ids, h_mask, f_ids, f_mask = end_aligned(scope, hostile, friendly)
    return _Batch(h_ids, h_mask), _Batch(f_ids, f_mask)


def _probe(features: dict[str, torch.Tensor], labels: list[str], groups: list[int], n_shuffles: int,
           ridge: float, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(accuracy [point], mean shuffled-label accuracy [point], chance): ridge probes, L2 strength
    ``ridge`` per training example, trained on one group and tested on the other."""
    fit = lambda y: train_probes(features, y, groups=groups, test_fraction=0.5, seed=seed, classifier="ridge",  # noqa: E731
                                 C=1 / (ridge * len(labels) / 2))
    with threadpool_limits(1):   # tiny fits: a second BLAS thread on a busy machine costs 8x
        real = fit(labels)
        control = np.mean([fit(shuffled(labels, seed + i)).test_accuracy for i in range(n_shuffles)], 0)
    return real.test_accuracy, control, real.chance


@torch.no_grad()
def _patch_effects(scope, hostile: _Batch, friendly: _Batch, words, exact_heads: int) -> tuple[torch.Tensor, float]:
    """([layer, head] log-odds (nats) restored in the friendly run by each head's output
    (``attn.hook_z``, every position, pairs aligned at their ends) taken from the hostile run;
    the hostile - friendly gap). Where a hostile prompt is shorter, the friendly run keeps its
    own values at the positions before it starts. The ``exact_heads`` heads of largest
    attribution-patching estimate (gradient x difference, one backward pass) are patched one by
    one; the others keep their estimate (`attribution_patching.screened`)."""
    config = scope.model.config
    names = [act_name("attn.hook_z", l) for l in range(config.num_hidden_layers)]
    _, cache = scope.run_with_cache(hostile.ids, names=names, attention_mask=hostile.mask)
    if not torch.equal(hostile.mask, friendly.mask):
        _, own = scope.run_with_cache(friendly.ids, names=names, attention_mask=friendly.mask)
        cache = ActivationCache({n: where_present(hostile.mask, cache[n], own[n]) for n in names},
                                input_ids=hostile.ids, attention_mask=hostile.mask)
    base = friendly.log_odds(scope, words).mean()
    acts, grads = site_gradients(scope, friendly.ids, friendly.mask, names, friendly.metric(words))
    estimates = torch.stack([((cache[n].to(grads[n]) - acts[n]) * grads[n]).sum((0, 1, 3)).cpu() for n in names])
    exact = lambda index: float(friendly.log_odds(scope, words, patch_from(cache, names[index[0]], heads=[index[1]])  # noqa: E731
                                                  ).mean() - base)
    effects, _ = screened(estimates, exact, exact_heads)
    return effects, float(hostile.log_odds(scope, words).mean() - base)


@torch.no_grad()
def _zeroed_drops(scope, batch: _Batch, words, exact_heads: int, always: list[tuple[int, int]]) -> torch.Tensor:
    """[layer, head] drop of the mean log-odds of ``batch`` with each head alone zeroed, exact for
    the ``exact_heads`` of largest attribution estimate and for the heads ``always``; the others
    keep their estimate."""
    config = scope.model.config
    names = [act_name("attn.hook_z", l) for l in range(config.num_hidden_layers)]
    clean = batch.log_odds(scope, words).mean()
    acts, grads = site_gradients(scope, batch.ids, batch.mask, names, batch.metric(words))
    estimates = -torch.stack([((0 - acts[n]) * grads[n]).sum((0, 1, 3)).cpu() for n in names])
    exact = lambda index: float(clean - batch.log_odds(scope, words, ablate_heads([index])).mean())  # noqa: E731
    drops, is_exact = screened(estimates, exact, exact_heads)
    for head in always:
        if not is_exact[head]:
            drops[head] = exact(head)
    return drops


def _insult_rate(scope, texts: Sequence[str], insult_ids: torch.Tensor, max_new_tokens: int, hooks: dict | None) -> float:
    """Share of greedily generated tokens that are insult words."""
    new = greedy_new_tokens(scope, texts, max_new_tokens, hooks=hooks)
    return float(torch.isin(new, insult_ids).float().mean())


@torch.no_grad()
def perplexity(scope, texts: Sequence[str], hooks: dict | None = None) -> float:
    """exp(mean next-token cross-entropy) over the real tokens of ``texts`` (hooks in force)."""
    ids, mask = token_batch(scope, list(texts))
    logits = scope.run(ids, attention_mask=mask, hooks=hooks).float().cpu()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return math.exp(float(nll[mask[:, 1:].flatten().bool()].mean()))


def _insult_share(scope, direction: torch.Tensor, insults: set[str], k: int = 10) -> tuple[float, pd.DataFrame]:
    frame = vocab_projection(scope, direction, k=k)
    return sum(t.strip() in insults for t in frame["promoted"]) / k, frame


def _translated(lens: TunedLens, point: str, v: torch.Tensor) -> torch.Tensor:
    """The tuned lens's linear part applied to a direction: v + W v (no bias: a direction has no origin)."""
    return lens.translate(point, v) - lens.translate(point, torch.zeros_like(v))


@torch.no_grad()
def run_toxicity(scope, prompts: Sequence[Prompt] | str = "toxicity", *, neutral: Sequence[Prompt] | str = "neutral",
                 insults: Sequence[str] | None = None, praises: Sequence[str] | None = None,
                 strengths: Sequence[float] = DEFAULT_STRENGTHS, max_new_tokens: int = 8,
                 seeds: Sequence[int] = DEFAULT_SEEDS, n_shuffles: int = 5, n_random_directions: int = 20,
                 n_random_heads: int = 10, headroom: float = 1 / 3, probe_ridge: float = 0.01,
                 lens_steps: int = LENS_STEPS, heads: Sequence[tuple[int, int]] | None = None,
                 exact_heads: int = EXACT_HEADS, seed: int = 0,
                 progress: Progress | None = None) -> ToxicityResult:
    """The toxicity study (see module docstring).

    prompts: a set name or `Prompt`s with metadata ``label`` ('hostile'/'friendly'), ``pair`` (the
    two prompts of a pair share it; their token lengths may differ) and optionally ``split``
    (in-distribution when absent; ``ood`` pairs only enter the insult probabilities);
    neutral: held-out neutral text; insults/praises: word classes, resolved by this model's tokenizer
    (a word of several tokens counts by its first token, `inputs.word_class_ids`; default: the
    prompt set's task, ``"insults"``/``"praises"`` in ``<set>.task.json``); strengths: steering
    strengths s >= 0, 0 first (the unsteered baseline); heads: measure the cue-head claims on these
    (layer, head) pairs instead of the heads patching names (a hypothesis to test, or a planted
    wrong answer that the claims must reject); exact_heads: heads patched (and zeroed) one by one,
    those of largest attribution-patching estimate; the others keep their estimate (every head of
    a model with this many or fewer: the organism's 16); progress: hears each piece of work as it finishes (`analysis.progress`)."""
    rows = rows_of(prompts)
    labels = [p.metadata.get("label") for p in rows]
    if not {"hostile", "friendly"} <= set(labels) <= set(LABELS):
        raise AnalysisInputError(f"toxicity prompts need metadata label 'hostile' or 'friendly' (or 'none': the pair "
                                 f"without its cue); got {sorted(set(map(str, labels)))}")
    if not strengths or strengths[0] != 0 or any(s < 0 for s in strengths):
        raise AnalysisInputError(f"strengths must start with 0 (the unsteered baseline) and be >= 0, got {list(strengths)}")
    insults = list(task_value(prompts, "insults", insults, parameter="insults"))
    praises = list(task_value(prompts, "praises", praises, parameter="praises"))
    classes = distinct_word_classes(scope, {"insults": insults, "praises": praises}, prompts)
    words = (classes["insults"], classes["praises"])
    by_pair: dict = {}
    for p in rows:
        by_pair.setdefault((split_of(p), p.metadata.get("pair")), {})[p.metadata["label"]] = p.text
    pairs = {key: v for key, v in by_pair.items() if "hostile" in v and "friendly" in v}
    ind = sorted((k for k in pairs if k[0] == IN_DISTRIBUTION), key=lambda k: k[1])
    fit, evaluate = ind[0::2], ind[1::2]
    if not fit or not evaluate:
        raise AnalysisInputError("the toxicity study needs at least two in-distribution hostile/friendly pairs")
    texts_of = lambda keys, label: [pairs[k][label] for k in keys]  # noqa: E731
    fit_h, fit_f = _pairs(scope, texts_of(fit, "hostile"), texts_of(fit, "friendly"))
    eval_h, eval_f = _pairs(scope, texts_of(evaluate, "hostile"), texts_of(evaluate, "friendly"))
    neutral_texts = [p.text for p in rows_of(neutral)]
    neutral_fit, neutral_eval = neutral_texts[0::2], neutral_texts[1::2]

    # probes on the in-distribution prompts, pairs split by parity; random-init null
    probe_texts = [t for k in ind for t in (pairs[k]["hostile"], pairs[k]["friendly"])]
    probe_labels = [label for _ in ind for label in ("hostile", "friendly")]
    probe_groups = [i % 2 for i in range(len(ind)) for _ in range(2)]
    points = residual_points(scope)
    layers = [point_label(p) for p in points]
    accuracy, shuffled_acc, chance = _probe(live_features(scope, probe_texts, points)[0], probe_labels,
                                            probe_groups, n_shuffles, probe_ridge, seed)

    def insult_probs(s, keys) -> tuple[float, float]:
        h, f = _pairs(s, texts_of(keys, "hostile"), texts_of(keys, "friendly"))
        return tuple(_insult_mass(s, b, words[0]) for b in (h, f))

    insult_prob = {split: insult_probs(scope, sorted(k for k in pairs if k[0] == split))
                   for split in dict.fromkeys(k[0] for k in pairs)}
    no_cue = {split: _insult_mass(scope, _Batch(*token_batch(scope, texts)), words[0])
              for split in insult_prob if (texts := [v["none"] for k, v in pairs.items() if k[0] == split and "none" in v])}
    report(progress, "probes, insult probabilities")

    # cue heads: patching on the fit pairs; random-init null of the largest share
    effects, gap = _patch_effects(scope, fit_h, fit_f, words, exact_heads)
    unit = gap if gap > 1e-3 else 1.0   # a model that shows no gap: shares of one nat
    patch = effects / unit
    report(progress, "cue-head patching")
    null: dict[str, list[float]] = {k: [] for k in ("insult_prob_ratio", "output_log_odds_gap", "cue_heads_log_odds_drop",
                                                    "log_odds_drop_steered")}
    null_selectivity, cue_null, null_patches = [], [], []
    for rand in random_init_scopes(scope, seeds, progress=progress, step="random-init controls: probes, patching"):
        acc, ctrl, _ = _probe(live_features(rand, probe_texts, points)[0], probe_labels, probe_groups, n_shuffles, probe_ridge, seed)
        null_selectivity.append(acc - ctrl)
        hostile_p, friendly_p = insult_probs(rand, ind)
        null["insult_prob_ratio"].append(rounded(hostile_p / friendly_p))
        null["output_log_odds_gap"].append(rounded((eval_h.log_odds(rand, words) - eval_f.log_odds(rand, words)).mean()))
        shares = _patch_effects(rand, fit_h, fit_f, words, exact_heads)[0] / unit   # in units of this model's gap
        null_patches.append(shares)
        cue_null.append(rounded(shares.abs().max()))
    null_selectivity = np.stack(null_selectivity)
    selectivity = accuracy - shuffled_acc
    probe_bar = [null_threshold(null_selectivity[:, i], headroom, top=1 - chance) for i in range(len(points))]
    probe_layer = next((i for i in range(len(points)) if selectivity[i] >= probe_bar[i]), None)
    cue_threshold = null_threshold(cue_null, headroom)
    # heads carry the cue only if the cue has an effect beyond random init: the output's gap first
    hostile_odds = eval_h.log_odds(scope, words)
    output_gap = Controlled(rounded((hostile_odds - eval_f.log_odds(scope, words)).mean()),
                            null["output_log_odds_gap"], "random init")
    cue_heads = [tuple(h) for h in heads] if heads is not None else named_heads(patch, cue_threshold) if output_gap.clears else []

    # the cue heads matter: ablations on the evaluation hostile prompts against random heads / random init
    config = scope.model.config
    clean_odds = hostile_odds.mean()
    cue_drop, cue_drop_random = {}, {}
    head_drops = torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    if cue_heads:   # every head alone, zeroed: where the named heads rank among all heads
        head_drops = _zeroed_drops(scope, eval_h, words, exact_heads, cue_heads)
        draws = [random_heads(config.num_hidden_layers, config.num_attention_heads, len(cue_heads), exclude=cue_heads,
                              seed=seed + i) for i in range(n_random_heads)]
        reference = reference_cache(scope, neutral_fit, range(config.num_hidden_layers))
        for method in ABLATIONS:
            drop = lambda chosen: rounded(clean_odds - eval_h.log_odds(scope, words, ablate_heads_by(chosen, method, reference, seed)).mean())  # noqa: E731
            cue_drop[method] = drop(cue_heads)
            cue_drop_random[method] = [drop(d) for d in draws]
    report(progress, "cue-head ablations")

    # where the register is read: both lenses on the evaluation pairs; the tuned lens fitted here
    lens = fit_study_lens(scope, neutral_fit + texts_of(fit, "hostile") + texts_of(fit, "friendly"),
                          steps=lens_steps, seed=seed)
    lens_kl = compare_lenses(scope, neutral_eval + texts_of(evaluate, "hostile") + texts_of(evaluate, "friendly"), lens)
    lens_gap, read_layer = {}, {}
    for name, translate in zip(LENSES, (None, lens.translate)):
        odds = [logit_lens(scope, batch.ids, attention_mask=batch.mask, position="last", translate=translate).logits[:, :, 0]
                for batch in (eval_h, eval_f)]          # [point, batch, vocab] each
        gap = torch.stack([(o[:, :, words[0]].logsumexp(-1) - o[:, :, words[1]].logsumexp(-1)) for o in odds])
        lens_gap[name] = (gap[0] - gap[1]).mean(-1)
        read_layer[name] = first_layer_from([bool(g >= 0.5 * lens_gap[name][-1]) for g in lens_gap[name]]) \
            if output_gap.clears else None
    report(progress, "tuned lens, read layers")

    # the hostile direction at the probe layer (else the most selective block output: the pairs'
    # last tokens are the same word, so the embeddings hold no difference), fitted on the fit pairs
    point = points[probe_layer if probe_layer is not None else 1 + int(np.argmax(selectivity[1:]))]
    direction = mean_difference_vector(scope, texts_of(fit, "hostile"), texts_of(fit, "friendly"), hook=point)
    randoms = random_directions(direction.vector, n_random_directions, seed=seed)
    insult_set = set(insults)
    top_tokens, insult_share, insult_share_random = {}, {}, {}
    for name, view in zip(LENSES, (lambda v: v, lambda v: _translated(lens, point, v))):
        insult_share[name], top_tokens[name] = _insult_share(scope, view(direction.vector), insult_set)
        insult_share_random[name] = [_insult_share(scope, view(r), insult_set)[0] for r in randoms]
    report(progress, "hostile direction")

    # steering: strength chosen on the fit pairs, measured on the evaluation pairs and neutral text
    fit_texts, eval_texts = texts_of(fit, "hostile"), texts_of(evaluate, "hostile")
    steer = lambda v, s: add_vector(point, v, scale=-s)  # noqa: E731
    sweep = pd.DataFrame([dict(strength=float(s),
                               fit_insult_rate=_insult_rate(scope, fit_texts, words[0], max_new_tokens, steer(direction.vector, s)),
                               insult_rate=_insult_rate(scope, eval_texts, words[0], max_new_tokens, steer(direction.vector, s)),
                               log_odds=float(eval_h.log_odds(scope, words, steer(direction.vector, s)).mean()),
                               perplexity=perplexity(scope, neutral_eval, steer(direction.vector, s)))
                          for s in strengths])
    halved = sweep[(sweep["strength"] > 0) & (sweep["fit_insult_rate"] <= 0.5 * sweep["fit_insult_rate"].iloc[0])]
    strength = float(halved["strength"].iloc[0] if len(halved) else sweep["strength"].iloc[-1])
    steer_random = pd.DataFrame([dict(insult_rate=_insult_rate(scope, eval_texts, words[0], max_new_tokens, steer(r, strength)),
                                      log_odds=float(eval_h.log_odds(scope, words, steer(r, strength)).mean()),
                                      perplexity=perplexity(scope, neutral_eval, steer(r, strength)))
                                 for r in randoms])
    report(progress, "steering sweep")

    # random-init null of the claims that need the model's own heads or direction
    for rand, shares in zip(random_init_scopes(scope, seeds, progress=progress,
                                               step="random-init controls: ablation, steering"), null_patches):
        clean = eval_h.log_odds(rand, words).mean()
        if cue_heads:
            top = top_heads(shares, len(cue_heads))
            null["cue_heads_log_odds_drop"].append(rounded(clean - eval_h.log_odds(rand, words, ablate_heads(top)).mean()))
        v = mean_difference_vector(rand, texts_of(fit, "hostile"), texts_of(fit, "friendly"), hook=point).vector
        null["log_odds_drop_steered"].append(rounded(clean - eval_h.log_odds(rand, words, steer(v, strength)).mean()))

    return ToxicityResult(points=points, layers=layers, accuracy=accuracy, shuffled_accuracy=shuffled_acc, chance=chance,
                          null_selectivity=null_selectivity, probe_bar=probe_bar, probe_layer=probe_layer, lens_gap=lens_gap, lens_kl=lens_kl,
                          read_layer=read_layer, patch=patch, cue_null=cue_null, cue_threshold=cue_threshold,
                          cue_heads=cue_heads, heads_given=heads is not None, head_drops=head_drops, cue_drop=cue_drop,
                          cue_drop_random=cue_drop_random, direction=direction,
                          top_tokens=top_tokens, insult_share=insult_share, insult_share_random=insult_share_random,
                          sweep=sweep, strength=strength, steer_random=steer_random, insult_prob=insult_prob,
                          insult_prob_no_cue=no_cue, pairs=(len(fit), len(evaluate)), null=null)
