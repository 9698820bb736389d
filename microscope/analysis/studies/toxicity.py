"""Toxic generation: where the model tells a hostile context from a friendly one, the direction that
carries it, what writes insults into the logits, and how far steering against it goes.

Four measurements on the built-in ``toxicity`` set (pairs of hostile / friendly contexts of equal
length ending in a register-neutral frame such as ``you are a``):

- probe accuracy by layer: a linear probe (`probes.train_probes`) on the last-token residual at
  each lens point (embeddings, then each block's output), pairs kept on one side of the split;
  the probe layer is the first point from which held-out accuracy stays >= ``probe_threshold``;
- the hostile direction: mean hostile minus mean friendly residual at the probe layer
  (`steering.mean_difference_vector`), and the tokens the same difference at the last block's
  output promotes (`lens.vocab_projection`);
- direct logit attribution (`attribution.direct_logit_attribution`) of the insult-versus-praise
  logit difference on hostile contexts, averaged over the word pairs: the heads and MLP neurons
  that write insults most;
- a steering sweep: the direction subtracted at every position with strength s (``-s * v``)
  while greedily continuing hostile contexts: the insult-word rate (share of generated tokens
  that are insult words) against the perplexity of friendly text under the same steering.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.attribution import direct_logit_attribution
from microscope.analysis.inputs import token_batch
from microscope.analysis.lens import point_label, residual_points
from microscope.analysis.probes import ProbeResult, live_features, train_probes
from microscope.analysis.results import Result
from microscope.analysis.steering import SteeringVector, mean_difference_vector
from microscope.analysis.studies.base import first_layer_from, greedy_new_tokens, single_token_id
from microscope.errors import AnalysisInputError
from microscope.hooks.interventions import ablate_heads
from microscope.names import head_label
from microscope.prompts import BUILTIN_DIR, Prompt, load_prompts
from microscope.viz.figures import head_grid, line_plot

DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


WORDS_FILE = BUILTIN_DIR / "toxicity_words.json"   # the insult and praise words of the built-in set


def builtin_words() -> tuple[list[str], list[str]]:
    """(insults, praises): the one-token words the built-in ``toxicity`` prompts are written with."""
    words = json.loads(WORDS_FILE.read_text(encoding="utf-8"))
    return list(words["insults"]), list(words["praises"])


@dataclass(repr=False)
class ToxicityResult(Result):
    """probe: per-point probe accuracies; points/layers: lens points and their labels;
    probe_layer: index into points or None; direction: the hostile steering vector;
    top_tokens: the vocabulary projection (frame) of the hostile direction at the last block's
    output, where the unembedding reads; insult_share_top: share of insult words among the
    promoted tokens; head_dla: [layer, head] mean insult-vs-praise direct logit attribution (what a
    head writes straight into the logits); head_ablation: [layer, head] drop of the insult-vs-praise
    log-odds when the head is zeroed (its total effect, through later layers too);
    top_neurons: frame (layer, neuron, value); sweep: frame (strength, insult_rate, perplexity)."""

    probe: ProbeResult
    points: list[str]
    layers: list[str]
    probe_threshold: float
    probe_layer: int | None
    direction: SteeringVector
    top_tokens: pd.DataFrame
    insult_share_top: float
    insult_share_chance: float
    head_dla: torch.Tensor
    head_ablation: torch.Tensor
    top_neurons: pd.DataFrame
    sweep: pd.DataFrame
    insult_prob_hostile: float
    insult_prob_friendly: float
    title: str = "toxicity"

    def best_steering(self, max_perplexity_cost: float = 0.10) -> pd.Series | None:
        """The sweep row with the lowest insult rate among those within the perplexity budget."""
        base = self.sweep.iloc[0]
        ok = self.sweep[(self.sweep["perplexity"] <= base["perplexity"] * (1 + max_perplexity_cost))
                        & (self.sweep["strength"] > 0)]
        return None if ok.empty else ok.sort_values(["insult_rate", "strength"]).iloc[0]

    def to_frame(self) -> pd.DataFrame:
        """The probe accuracy per lens point (one row each), with the probe layer marked."""
        return pd.DataFrame(dict(point=self.points, layer=self.layers,
                                 test_accuracy=self.probe.test_accuracy,
                                 train_accuracy=self.probe.train_accuracy, chance=self.probe.chance,
                                 probe_layer=[i == self.probe_layer for i in range(len(self.points))]))

    def figures(self) -> list[go.Figure]:
        probe = line_plot({"held-out": self.probe.test_accuracy, "train": self.probe.train_accuracy},
                          x=self.layers, hline=self.probe.chance, title="hostile vs friendly: probe accuracy by layer",
                          x_title="layer", y_title="accuracy")
        heads = head_grid(self.head_dla, title="direct logit attribution to insult - praise (hostile contexts)",
                          colorbar="logit")
        ablation = head_grid(self.head_ablation, title="insult - praise log-odds lost when a head is zeroed",
                             colorbar="nats")
        sweep = go.Figure(go.Scatter(x=self.sweep["perplexity"], y=self.sweep["insult_rate"],
                                     mode="lines+markers+text", text=[f"s={s:g}" for s in self.sweep["strength"]],
                                     textposition="top center"))
        sweep.update_layout(title="steering against the hostile direction", xaxis_title="perplexity on friendly text",
                            yaxis_title="insult-word rate of hostile continuations")
        return [probe, heads, ablation, sweep]

    def summary(self) -> dict:
        base = self.sweep.iloc[0]
        best = self.best_steering()
        top = int(self.head_dla.flatten().argmax())
        n_heads = self.head_dla.shape[1]
        causal = int(self.head_ablation.flatten().argmax())
        out = {
            "probe_layer": self.probe_layer,
            "probe_layer_name": None if self.probe_layer is None else self.layers[self.probe_layer],
            "probe_accuracy_by_layer": [round(float(a), 3) for a in self.probe.test_accuracy],
            "probe_chance": round(self.probe.chance, 3),
            "insult_prob_hostile": round(self.insult_prob_hostile, 5),
            "insult_prob_friendly": round(self.insult_prob_friendly, 5),
            "direction_top_tokens": self.top_tokens["promoted"].str.strip().tolist(),
            "direction_insult_share_top": round(self.insult_share_top, 3),
            "direction_insult_share_chance": round(self.insult_share_chance, 3),
            "top_insult_head": head_label(*divmod(top, n_heads)),
            "top_insult_head_dla": round(float(self.head_dla.flatten()[top]), 3),
            "top_ablation_head": head_label(*divmod(causal, n_heads)),
            "top_ablation_head_drop": round(float(self.head_ablation.flatten()[causal]), 3),
            "top_insult_neuron": (f"L{int(self.top_neurons.iloc[0]['layer'])}N{int(self.top_neurons.iloc[0]['neuron'])}"
                                  if len(self.top_neurons) else None),
            "insult_rate_unsteered": round(float(base["insult_rate"]), 4),
            "perplexity_unsteered": round(float(base["perplexity"]), 4),
        }
        if best is not None:
            cut = 1 - best["insult_rate"] / base["insult_rate"] if base["insult_rate"] > 0 else None
            out.update(steering_strength=float(best["strength"]),
                       insult_rate_steered=round(float(best["insult_rate"]), 4),
                       insult_rate_cut=None if cut is None else round(float(cut), 4),
                       perplexity_cost=round(float(best["perplexity"] / base["perplexity"] - 1), 4))
        return out


def insult_rate(scope, prompts: Sequence[str], insult_ids: torch.Tensor, vector: SteeringVector,
                strength: float, max_new_tokens: int) -> float:
    """Share of greedily generated tokens that are insult words, steering with ``-strength * vector``."""
    new = greedy_new_tokens(scope, prompts, max_new_tokens, hooks=vector.hooks(-strength))
    return float(torch.isin(new, insult_ids).float().mean())


@torch.no_grad()
def perplexity(scope, texts: Sequence[str], hooks: dict | None = None) -> float:
    """exp(mean next-token cross-entropy) over the real tokens of ``texts`` (hooks in force)."""
    ids, mask = token_batch(scope, list(texts))
    with scope.hooks(hooks or {}):
        logits = scope.run(ids, attention_mask=mask).float().cpu()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    keep = mask[:, 1:].flatten().bool()
    return math.exp(float(nll[keep].mean()))


@torch.no_grad()
def run_toxicity(scope, prompts: Sequence[Prompt] | str = "toxicity", *, insults: Sequence[str] | None = None,
                 praises: Sequence[str] | None = None, friendly_texts: Sequence[str] | None = None,
                 strengths: Sequence[float] = DEFAULT_STRENGTHS, probe_threshold: float = 0.9,
                 max_new_tokens: int = 16, n_steer_prompts: int = 32, seed: int = 0) -> ToxicityResult:
    """The toxicity study (see module docstring).

    prompts: a set name or `Prompt`s with metadata ``label`` ('hostile'/'friendly') and optionally
    ``pair`` (kept together in the probe split); insults/praises: one-token words (default: the
    built-in set's words, `builtin_words`); friendly_texts: text for the perplexity cost (default:
    the friendly prompts); strengths: steering strengths s >= 0 (0 first = unsteered)."""
    rows = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    labels = [p.metadata.get("label") for p in rows]
    if set(labels) != {"hostile", "friendly"}:
        raise AnalysisInputError(f"toxicity prompts need metadata label 'hostile' or 'friendly'; got {sorted(set(map(str, labels)))}")
    if not strengths or strengths[0] != 0 or any(s < 0 for s in strengths):
        raise AnalysisInputError(f"strengths must start with 0 (the unsteered baseline) and be >= 0, got {list(strengths)}")
    default_insults, default_praises = builtin_words()
    insults, praises = list(insults or default_insults), list(praises or default_praises)
    texts = [p.text for p in rows]
    hostile = [t for t, l in zip(texts, labels) if l == "hostile"]
    friendly = [t for t, l in zip(texts, labels) if l == "friendly"]
    insult_ids = torch.tensor([single_token_id(scope, w) for w in insults])
    praise_ids = torch.tensor([single_token_id(scope, w) for w in praises])

    # 1. probes at every lens point, pairs kept together
    points = residual_points(scope)
    features, _ = live_features(scope, texts, points)
    groups = [p.metadata.get("pair", i) for i, p in enumerate(rows)]
    probe = train_probes(features, labels, groups=groups, seed=seed)
    probe_layer = first_layer_from([a >= probe_threshold for a in probe.test_accuracy])
    layers = [point_label(name) for name in points]

    # 2. the hostile direction where the probe first works (else where it works best)
    steer_point = points[probe_layer if probe_layer is not None else int(np.argmax(probe.test_accuracy))]
    direction = mean_difference_vector(scope, hostile, friendly, hook=steer_point)
    # its vocabulary projection is read where the unembedding reads: the last block's output
    readout = mean_difference_vector(scope, hostile, friendly, hook=points[-1])
    top_tokens = readout.vocab_projection(scope, k=10)
    promoted = [t.strip() for t in top_tokens["promoted"]]
    insult_share = sum(t in insults for t in promoted) / len(promoted)
    chance = len(insults) / len(scope.tokenizer)

    # 3. direct logit attribution of insult - praise on hostile contexts, averaged over word pairs
    n_pairs = min(len(insult_ids), len(praise_ids))
    head_dla, neurons, probs = None, None, None
    for i in range(n_pairs):
        dla = direct_logit_attribution(scope, hostile, insult_ids[i].item(), baseline=praise_ids[i].item())
        head_dla = dla.head_grid() / n_pairs + (0 if head_dla is None else head_dla)
        neuron_mean = dla.neurons.mean(0) / n_pairs
        neurons = neuron_mean if neurons is None else neurons + neuron_mean
    flat = neurons.flatten().topk(10)
    d_mlp = neurons.shape[1]
    top_neurons = pd.DataFrame([dict(layer=int(i) // d_mlp, neuron=int(i) % d_mlp, value=float(v))
                                for v, i in zip(flat.values, flat.indices)])
    head_ablation = _head_ablation(scope, hostile, insult_ids, praise_ids)
    ids, mask = token_batch(scope, texts)
    logits = scope.run(ids, attention_mask=mask).float().cpu()
    probs = logits[torch.arange(len(ids)), mask.sum(-1) - 1].softmax(-1)[:, insult_ids].sum(-1)
    is_hostile = torch.tensor([l == "hostile" for l in labels])

    # 4. steering sweep
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(hostile), generator=g)[:n_steer_prompts].tolist()
    steer_prompts = [hostile[i] for i in pick]
    ppl_texts = list(friendly_texts) if friendly_texts is not None else friendly
    sweep = pd.DataFrame([dict(strength=float(s),
                               insult_rate=insult_rate(scope, steer_prompts, insult_ids, direction, s, max_new_tokens),
                               perplexity=perplexity(scope, ppl_texts, direction.hooks(-s)))
                          for s in strengths])
    return ToxicityResult(probe=probe, points=points, layers=layers, probe_threshold=probe_threshold,
                          probe_layer=probe_layer, direction=direction, top_tokens=top_tokens,
                          insult_share_top=insult_share, insult_share_chance=chance, head_dla=head_dla,
                          head_ablation=head_ablation,
                          top_neurons=top_neurons, sweep=sweep,
                          insult_prob_hostile=float(probs[is_hostile].mean()),
                          insult_prob_friendly=float(probs[~is_hostile].mean()))


@torch.no_grad()
def _head_ablation(scope, prompts: Sequence[str], insult_ids: torch.Tensor,
                   praise_ids: torch.Tensor) -> torch.Tensor:
    """[layer, head]: mean last-token log-odds of insult vs praise mass, clean minus head zeroed."""
    ids, mask = token_batch(scope, prompts)
    last = mask.sum(-1) - 1

    def log_odds(hooks=None) -> float:
        logits = scope.run(ids, attention_mask=mask, hooks=hooks).float().cpu()
        logp = logits[torch.arange(len(ids)), last].log_softmax(-1)
        return float((logp[:, insult_ids].logsumexp(-1) - logp[:, praise_ids].logsumexp(-1)).mean())

    config = scope.model.config
    clean = log_odds()
    return torch.tensor([[clean - log_odds(ablate_heads([(layer, head)]))
                          for head in range(config.num_attention_heads)]
                         for layer in range(config.num_hidden_layers)])
