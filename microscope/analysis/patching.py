"""Activation patching: which activations carry the difference between a clean and a corrupted
prompt, measured by the logit difference ``logit[answer] - logit[wrong]`` at the last token.

- Denoising (default): run the *corrupted* prompt, paste in one clean activation, and see how much
  of the clean logit difference comes back.
- Noising: run the *clean* prompt, paste in one corrupted activation, and see how much is lost.

Either way ``effect = metric(patched) - metric(base run)`` and
``normalized = mean effect / mean(metric(source) - metric(base))``: the fraction of the gap
between the two runs that this one site moves (1: it carries everything; 0: nothing).

Corruption defaults to *symmetric token replacement*: the corrupted prompt is the clean prompt
with every occurrence of the answer token and the wrong token swapped, so the corrupted run
prefers ``wrong`` for the same reason the clean one prefers ``answer`` (Zhang & Nanda 2024,
"Towards best practices of activation patching"). Pass ``corrupted=`` for any other pairing
(same token length as the clean prompts).

Sites: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (patched per layer x
position) and ``heads`` (``attn.hook_z`` of one head at every position, per layer x head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.inputs import TextsOrIds, Tokens, decode_token, last_positions, token_batch, token_ids
from microscope.analysis.results import Result
from microscope.errors import AnalysisInputError
from microscope.hooks.interventions import patch_from
from microscope.names import layer_names
from microscope.viz.figures import head_grid, layer_position_heatmap

# The sites patching reads, by the short name callers pass -> the hook site in every block.
SITES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "heads": "attn.hook_z",
}
MODES = ("denoising", "noising")


@dataclass(repr=False)
class PatchingResult(Result):
    """Patching effects on the logit difference.

    effects: [batch, layer, X] change in logit difference per prompt, X = positions (per-position
    sites) or heads (``site="heads"``); base_metric / source_metric: [batch] logit difference of
    the unpatched base and source runs; clean_ids/corrupted_ids: [batch, pos]."""

    site: str
    mode: str
    method: str  # "activation" or "attribution" (gradient estimate)
    effects: torch.Tensor
    base_metric: torch.Tensor
    source_metric: torch.Tensor
    clean_ids: torch.Tensor
    corrupted_ids: torch.Tensor
    tokens: list[str]
    title: str = "activation patching"

    @property
    def effect(self) -> torch.Tensor:
        """[layer, X] mean effect over prompts (logit-difference units)."""
        return self.effects.mean(0)

    @property
    def normalized(self) -> torch.Tensor:
        """[layer, X] mean effect / mean(source - base): the fraction of the gap moved."""
        gap = (self.source_metric - self.base_metric).mean()
        return self.effect / gap if gap.abs() > 1e-8 else torch.full_like(self.effect, float("nan"))

    @property
    def columns(self) -> str:
        return "head" if self.site == "heads" else "position"

    def to_frame(self) -> pd.DataFrame:
        """One row per layer x position (or head): effect, normalized."""
        eff, norm = self.effect, self.normalized
        rows = [dict(site=self.site, mode=self.mode, method=self.method, layer=l, **{self.columns: x},
                     effect=float(eff[l, x]), normalized=float(norm[l, x]))
                for l in range(eff.shape[0]) for x in range(eff.shape[1])]
        frame = pd.DataFrame(rows)
        if self.site != "heads":
            frame.insert(5, "token", [self.tokens[x] for x in frame["position"]])
        return frame

    def figures(self) -> list[go.Figure]:
        title = f"{self.method} patching ({self.mode}, {self.site}): fraction of logit-diff gap moved"
        if self.site == "heads":
            return [head_grid(self.normalized, title=title, colorbar="normalized")]
        return [layer_position_heatmap(self.normalized, tokens=self.tokens,
                                       layers=[f"L{l}" for l in range(self.effect.shape[0])],
                                       title=title, colorbar="normalized")]

    def summary(self) -> dict:
        flat = self.normalized.flatten()
        i = int(flat.nan_to_num(0).abs().argmax())
        l, x = divmod(i, self.effect.shape[1])
        return {"base_metric": round(float(self.base_metric.mean()), 4),
                "source_metric": round(float(self.source_metric.mean()), 4),
                "strongest_layer": l, f"strongest_{self.columns}": x,
                "strongest_normalized": round(float(flat[i]), 4)}


def symmetric_corruption(ids: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """ids [batch, pos] with every occurrence of answer[b] and wrong[b] swapped in row b."""
    out = ids.clone()
    a, w = answer[:, None], wrong[:, None]
    out[ids == a] = w.expand_as(ids)[ids == a]
    out[ids == w] = a.expand_as(ids)[ids == w]
    unchanged = (out == ids).all(-1)
    if unchanged.any():
        rows = unchanged.nonzero().flatten().tolist()
        raise AnalysisInputError(f"prompts {rows} contain neither the answer nor the wrong token, so "
                                 "symmetric corruption changes nothing; pass corrupted= prompts")
    return out


def logit_diff(logits: torch.Tensor, positions: torch.Tensor, answer: torch.Tensor,
               wrong: torch.Tensor) -> torch.Tensor:
    """[batch] logit[answer] - logit[wrong] at one position per prompt; logits [batch, pos, vocab]."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, positions.to(logits.device)].float()
    return (last.gather(-1, answer[:, None].to(last.device))
            - last.gather(-1, wrong[:, None].to(last.device))).squeeze(-1)


class PatchingInputs(NamedTuple):
    """What a patching run needs: clean, corrupted, base and source ids [batch, pos] (denoising:
    base = corrupted, source = clean; noising: the reverse), mask, answer/wrong ids [batch], the
    site's hook names and each prompt's last position [batch]."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    base: torch.Tensor
    source: torch.Tensor
    mask: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    names: list[str]
    last: torch.Tensor


def patching_inputs(scope, clean: TextsOrIds, corrupted: TextsOrIds | None, answer: Tokens, wrong: Tokens,
                    attention_mask: torch.Tensor | None = None, *, mode: str, site: str) -> PatchingInputs:
    """Check and tokenise a patching run's inputs (clean and corrupted of equal token lengths)."""
    if mode not in MODES:
        raise AnalysisInputError(f"mode must be one of {MODES}, got {mode!r}")
    clean_ids, mask = token_batch(scope, clean, attention_mask)
    batch = clean_ids.shape[0]
    ans, wr = token_ids(scope, answer, batch), token_ids(scope, wrong, batch)
    if corrupted is None:
        corrupt_ids = symmetric_corruption(clean_ids, ans, wr)
    else:
        corrupt_ids, corrupt_mask = token_batch(scope, corrupted, attention_mask)
        if corrupt_ids.shape != clean_ids.shape or not torch.equal(corrupt_mask, mask):
            raise AnalysisInputError(
                f"clean {tuple(clean_ids.shape)} and corrupted {tuple(corrupt_ids.shape)} prompts must have the "
                "same token lengths, prompt by prompt, so positions line up; check scope.tokenize on both")
    base, source = (corrupt_ids, clean_ids) if mode == "denoising" else (clean_ids, corrupt_ids)
    return PatchingInputs(clean_ids, corrupt_ids, base, source, mask, ans, wr, site_names(scope, site), last_positions(mask))


def site_names(scope, site: str) -> list[str]:
    if site not in SITES:
        raise AnalysisInputError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
    return layer_names(SITES[site], scope.model.config.num_hidden_layers)


@torch.no_grad()
def run_patched(scope, base: torch.Tensor, source_cache, names: list[str], *,
                attention_mask: torch.Tensor, positions=None) -> torch.Tensor:
    """Logits of the base ids with the named hooks replaced by the source cache's values
    (`hooks.interventions.patch_from`), at the given positions (all when None)."""
    with scope.hooks(patch_from(source_cache, names, positions=positions)):
        return scope.run(base, attention_mask=attention_mask)


def _variant_mask(n_variants: int, acts: torch.Tensor, per_head: bool) -> torch.Tensor:
    """Bool mask broadcastable to acts [variants, batch, pos, ...]: variant v patches index v of
    the position axis (or of the head axis for hook_z)."""
    eye = torch.eye(n_variants, dtype=torch.bool, device=acts.device)
    shape = [n_variants] + [1] * (acts.ndim - 1)
    axis = 3 if per_head else 2  # in [variants, batch, pos, (head), ...]
    shape[axis] = n_variants
    return eye.reshape(shape)


@torch.no_grad()
def activation_patching(scope, clean: TextsOrIds, corrupted: TextsOrIds | None = None, *, answer: Tokens,
                        wrong: Tokens, site: str = "resid_pre", mode: str = "denoising",
                        attention_mask: torch.Tensor | None = None, max_rows: int = 256) -> PatchingResult:
    """Patch one site at a time (each layer x position, or each layer x head) between clean and
    corrupted runs and measure the logit difference at each prompt's last token.

    clean/corrupted: texts or ids [batch, pos] of equal token lengths (corrupted default: symmetric
    corruption, see module docstring); answer/wrong: token ids or one-token strings (one, or one per
    prompt); site: one of SITES; mode: "denoising" or "noising"; max_rows: batch rows per forward
    pass (patches are batched: one pass covers many positions or heads)."""
    clean_ids, corrupt_ids, base, source, mask, ans, wr, names, last = patching_inputs(
        scope, clean, corrupted, answer, wrong, attention_mask, mode=mode, site=site)
    base_metric = logit_diff(scope.run(base, attention_mask=mask), last, ans, wr).cpu()
    source_logits, source_cache = scope.run_with_cache(source, names=names, attention_mask=mask)
    source_metric = logit_diff(source_logits, last, ans, wr).cpu()

    batch, n_pos = base.shape
    n_variants = scope.model.config.num_attention_heads if site == "heads" else n_pos
    per_chunk = max(1, max_rows // batch)
    effects = torch.zeros(batch, len(names), n_variants)
    for l, name in enumerate(names):
        for start in range(0, n_variants, per_chunk):
            variants = list(range(start, min(n_variants, start + per_chunk)))
            k = len(variants)

            def paste(act, hook, variants=variants, k=k):
                src = source_cache[hook.name].to(act.device, act.dtype)
                acts = act.reshape(k, batch, *act.shape[1:])
                choose = _variant_mask(n_variants, acts, site == "heads")[variants]
                return torch.where(choose, src[None], acts).reshape(act.shape)

            with scope.hooks({name: paste}):
                logits = scope.run(base.repeat(k, 1), attention_mask=mask.repeat(k, 1))
            metric = logit_diff(logits, last.repeat(k), ans.repeat(k), wr.repeat(k)).cpu()
            effects[:, l, start:start + k] = (metric.reshape(k, batch) - base_metric).T
    tokens = [decode_token(scope.tokenizer, t) for t in clean_ids[0]]
    return PatchingResult(site=site, mode=mode, method="activation", effects=effects, base_metric=base_metric,
                          source_metric=source_metric, clean_ids=clean_ids, corrupted_ids=corrupt_ids,
                          tokens=tokens, title=f"activation patching ({mode}, {site})")
