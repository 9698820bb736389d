"""What the studies share: prompts and their splits, the one rule for split suffixes in headline
keys, greedy continuations, first layers, heads named against a
random-init null, reference activations for ablations (word classes: `analysis.inputs`).

Study results are ordinary analysis `Result`s (`microscope.analysis.results`, which also rounds
headline numbers: `rounded`, `round_headline`); the ablation
methods are `microscope.hooks.interventions.ABLATIONS`; the lenses are `studies.layers.LENSES`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from microscope.errors import AnalysisInputError
from microscope.names import act_name, head_label
from microscope.prompts import Prompt, load_prompts

IN_DISTRIBUTION = "in_distribution_heldout"   # the split of prompts like the training data (held out)


def split_of(prompt: Prompt) -> str:
    """The prompt's ``split`` metadata; a prompt without one is in-distribution."""
    return str(prompt.metadata.get("split", IN_DISTRIBUTION))


def split_suffix(split: str) -> str:
    """The end of a headline key measured on one split: "" for the in-distribution split, and
    ``_<split>`` for any other (``insult_prob_hostile`` / ``insult_prob_hostile_ood``). Every
    study names its per-split numbers this way, whatever order the prompts come in."""
    return "" if split == IN_DISTRIBUTION else f"_{split}"


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
    length and loops are seen whole. Refused when a prompt and its continuation would pass the
    model's learned positions (``max_position_embeddings``)."""
    limit = scope.model.config.max_position_embeddings
    lengths = scope.tokenize(list(texts))[1].sum(-1)
    if int(lengths.max()) + max_new_tokens > limit:
        i = int(lengths.argmax())
        raise AnalysisInputError(
            f"prompt {i} has {int(lengths[i])} tokens; with max_new_tokens={max_new_tokens} it passes this model's "
            f"{limit} positions: give shorter prompts or a smaller max_new_tokens")
    out = scope.generate(list(texts), max_new_tokens=max_new_tokens, hooks=hooks, do_sample=False,
                         eos_token_id=None)
    return out.new_tokens.cpu()


def rows_of(prompts: Sequence[Prompt] | str) -> list[Prompt]:
    """`Prompt`s from a built-in set name, a file path, or a list."""
    return load_prompts(prompts) if isinstance(prompts, str) else list(prompts)


def head_labels(heads: Sequence[tuple[int, int]]) -> list[str]:
    """["L{layer}H{head}", ...] in the given order."""
    return [head_label(l, h) for l, h in heads]


def null_threshold(null: Sequence[float], headroom: float, top: float = 1.0) -> float:
    """The score a component must reach to be named: m + headroom * (top - m), m = the highest
    score of the random-init null, ``top`` = the best score possible."""
    m = max(null)
    return m + headroom * (top - m)


def named_heads(scores: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """(layer, head) of every entry of ``scores`` [layer, head] >= threshold, best first."""
    return [h for h in top_heads(scores, scores.numel()) if float(scores[h]) >= threshold]


def top_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs of ``scores`` [layer, head] with the highest values, best first."""
    order = scores.flatten().argsort(descending=True)[:k]
    return [divmod(int(i), scores.shape[1]) for i in order]


@torch.no_grad()
def reference_cache(scope, texts: Sequence[str], layers: Sequence[int]):
    """`ActivationCache` of ``attn.hook_z`` at ``layers`` over ``texts`` (every position): the
    reference of mean and resample ablations (`hooks.interventions.ablate_heads_by`)."""
    names = [act_name("attn.hook_z", layer) for layer in sorted(set(layers))]
    return scope.run_with_cache(list(texts), names=names)[1]
