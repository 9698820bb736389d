"""Head scores: per-head [layer, head] grids that name what attention heads do.

Pattern scores (from ``blocks.*.attn.hook_pattern`` on any token ids; default: repeated random
tokens ``[bos, r_1..r_n, r_1..r_n]``, where every kind of head has something to find):

- previous-token: attention from position q to q-1;
- duplicate-token: attention from q to earlier positions holding the same token;
- induction (prefix matching): attention from q to the position *after* an earlier occurrence of
  the token at q (the key an induction head copies from).

Each is the mean, over the queries that have a target at all, of the attention mass on the
targets. ``chance`` is the same mean for uniform attention over the visible keys
(targets / (q + 1)), the score of a head that ignores the pattern. A head is *named* (``summary()``'s
``named_heads``) only when its score exceeds chance by :data:`NAMING_MARGIN` of attention mass, the
margin the top head's verdict (``top_score_clears_control``) states too: on random weights, where
attention is near uniform, no head is named.

Copying (from the weights, no prompts): for each token t of a sample, its embedding goes through
the head's OV circuit (layer LN in pre-LN, W_V, W_O, no biases) and the model's final path
(`models.anatomy.unembed`); the score is the fraction of tokens that land in their own top-k logits.
Chance is k / vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import pandas as pd
import plotly.graph_objects as go
import torch
from einops import rearrange

from microscope.analysis.controls import Controlled
from microscope.analysis.inputs import TextsOrIds, token_batch
from microscope.analysis.results import Result
from microscope.errors import AnalysisInputError
from microscope.models.anatomy import decoder, is_pre_ln, unembed
from microscope.names import every_layer, head_label, layer_names
from microscope.viz.figures import head_grid

PatternKind = Literal["previous_token", "duplicate_token", "induction"]
PATTERN_KINDS: tuple[str, ...] = get_args(PatternKind)
NAMING_MARGIN = 0.2   # attention mass (or token fraction, for copying) above chance that names a head


@dataclass(repr=False)
class HeadScores(Result):
    """scores: [layer, head] in [0, 1]; chance: the score of a head that ignores the pattern."""

    kind: str
    scores: torch.Tensor
    chance: float
    title: str = "head scores"

    def top(self, k: int = 5) -> pd.DataFrame:
        """The k highest-scoring heads: layer, head, score, ratio to chance."""
        flat = self.scores.flatten()
        n_heads = self.scores.shape[1]
        best = flat.argsort(descending=True)[:k]
        return pd.DataFrame([dict(layer=int(i) // n_heads, head=int(i) % n_heads, score=float(flat[i]),
                                  over_chance=float(flat[i]) / self.chance if self.chance else float("nan"))
                             for i in best])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([dict(kind=self.kind, layer=l, head=h, score=float(self.scores[l, h]),
                                  chance=self.chance)
                             for l in range(self.scores.shape[0]) for h in range(self.scores.shape[1])])

    def figures(self) -> list[go.Figure]:
        return [head_grid(self.scores, title=f"{self.kind} score (chance {self.chance:.3f})",
                          colorbar="score", diverging=False)]

    def named_heads(self) -> list[str]:
        """Labels of the heads scoring at least :data:`NAMING_MARGIN` above chance, best first."""
        top = self.top(self.scores.numel())
        return [head_label(int(r.layer), int(r.head)) for r in top.itertuples()
                if r.score > self.chance + NAMING_MARGIN]

    def summary(self) -> dict:
        best = self.top(1).iloc[0]
        verdict = Controlled(round(float(best["score"]), 4), (round(float(self.chance), 4),),
                             "uniform attention (chance)", margin=0.0, min_gap=NAMING_MARGIN)
        return {"top_head": head_label(int(best["layer"]), int(best["head"])),
                **verdict.headline("top_score"), "chance": round(float(self.chance), 4),
                "named_heads": ", ".join(self.named_heads()) or "none"}


def repeated_random_tokens(scope, *, n_prompts: int = 8, span: int = 16, seed: int = 0) -> torch.Tensor:
    """LongTensor [n_prompts, 1 + 2*span]: bos, then a random span of ordinary tokens, twice."""
    if scope.tokenizer is not None:
        n_vocab, special = len(scope.tokenizer), set(scope.tokenizer.all_special_ids)
    else:
        n_vocab, special = scope.model.config.vocab_size, set()
    n_vocab = min(n_vocab, scope.model.config.vocab_size)
    special |= {scope.model.config.pad_token_id, scope.model.config.bos_token_id}
    ordinary = torch.tensor([t for t in range(n_vocab) if t not in special])
    g = torch.Generator().manual_seed(seed)
    span_ids = ordinary[torch.randint(len(ordinary), (n_prompts, span), generator=g)]
    bos = torch.full((n_prompts, 1), scope.model.config.bos_token_id)
    return torch.cat([bos, span_ids, span_ids], 1)


def pattern_targets(ids: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Bool [batch, query, key]: which keys each query should attend to for a head of this kind."""
    n = ids.shape[1]
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    real = (mask[:, :, None] * mask[:, None, :]).bool()
    same = ids[:, :, None] == ids[:, None, :]  # [batch, q, k]: token at q == token at k
    if kind == "previous_token":
        targets = (k == q - 1).expand_as(same)
    elif kind == "duplicate_token":
        targets = same & (k < q)
    elif kind == "induction":
        earlier = same & (k < q)  # k is an earlier occurrence of the token at q ...
        targets = torch.zeros_like(same)
        targets[:, :, 1:] = earlier[:, :, :-1]  # ... so the key after it is k + 1,
        targets &= (k < q)  # which must be strictly before q
    else:
        raise AnalysisInputError(f"kind must be one of {PATTERN_KINDS}, got {kind!r}")
    return targets & real


def _score(patterns: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """patterns [layer, batch, head, q, k], targets [batch, q, k] -> scores [layer, head], chance."""
    has = targets.any(-1)  # [batch, q]: queries with something to find
    if not has.any():
        raise AnalysisInputError("these prompts give no query a target for this score (e.g. no repeated tokens)")
    mass = (patterns * targets[None, :, None].to(patterns.dtype)).sum(-1)  # [layer, batch, head, q]
    scores = (mass * has[None, :, None]).sum((1, 3)) / has.sum()
    visible = torch.arange(targets.shape[1]).add(1).float()  # q + 1 keys visible to query q
    chance = (targets.sum(-1) / visible)[has].mean().item()
    return scores, chance


@torch.no_grad()
def pattern_head_scores(scope, prompts: TextsOrIds | None = None, *, kinds: Sequence[PatternKind] = PATTERN_KINDS,
                        attention_mask: torch.Tensor | None = None) -> dict[str, HeadScores]:
    """Previous-token, duplicate-token and induction scores from one run (see module docstring).

    prompts: texts or ids; default `repeated_random_tokens(scope)`. Returns {kind: HeadScores}."""
    ids, mask = token_batch(scope, prompts if prompts is not None else repeated_random_tokens(scope),
                            attention_mask)
    _, cache = scope.run_with_cache(ids, names=[every_layer("pattern")], attention_mask=mask)
    n_layers = scope.model.config.num_hidden_layers
    patterns = torch.stack([cache[name].float().cpu() for name in layer_names("pattern", n_layers)])
    out = {}
    for kind in kinds:
        scores, chance = _score(patterns, pattern_targets(ids, mask, kind))
        out[kind] = HeadScores(kind=kind, scores=scores, chance=chance, title=f"{kind} scores")
    return out


def previous_token_scores(scope, prompts: TextsOrIds | None = None, **kw) -> HeadScores:
    """[layer, head] attention to the previous token (see `pattern_head_scores`)."""
    return pattern_head_scores(scope, prompts, kinds=["previous_token"], **kw)["previous_token"]


def duplicate_token_scores(scope, prompts: TextsOrIds | None = None, **kw) -> HeadScores:
    """[layer, head] attention to earlier copies of the current token."""
    return pattern_head_scores(scope, prompts, kinds=["duplicate_token"], **kw)["duplicate_token"]


def induction_scores(scope, prompts: TextsOrIds | None = None, **kw) -> HeadScores:
    """[layer, head] attention to the token after an earlier copy of the current token."""
    return pattern_head_scores(scope, prompts, kinds=["induction"], **kw)["induction"]


@torch.no_grad()
def copying_scores(scope, *, tokens: torch.Tensor | None = None, top_k: int = 5, n_tokens: int = 512,
                   seed: int = 0) -> HeadScores:
    """[layer, head] fraction of tokens whose own logit is in the top_k after the head's OV circuit.

    tokens: LongTensor of token ids to test (default: n_tokens ordinary tokens sampled with seed)."""
    if tokens is None:
        pool = repeated_random_tokens(scope, n_prompts=1, span=n_tokens, seed=seed)[0, 1:1 + n_tokens]
        tokens = pool.unique()
    cfg = scope.model.config
    dec = decoder(scope.model)
    x = dec.embed_tokens.weight[tokens.to(dec.embed_tokens.weight.device)].float()
    if dec.project_in is not None:
        x = x @ dec.project_in.weight.float().T
    n_heads = cfg.num_attention_heads
    scores = torch.zeros(cfg.num_hidden_layers, n_heads)
    for l, layer in enumerate(dec.layers):
        attn = layer.self_attn
        v_in = x
        if is_pre_ln(scope.model):
            ln = layer.self_attn_layer_norm
            v_in = torch.nn.functional.layer_norm(x, ln.normalized_shape,
                                                  None if ln.weight is None else ln.weight.float(),
                                                  None if ln.bias is None else ln.bias.float(), ln.eps)
        v = rearrange(v_in @ attn.v_proj.weight.float().T, "t (h e) -> t h e", h=n_heads)
        w_o = rearrange(attn.out_proj.weight.float(), "d (h e) -> h e d", h=n_heads)
        out = torch.einsum("the,hed->htd", v, w_o)  # [head, token, d_model]
        logits = unembed(scope.model, out)  # [head, token, vocab]
        top = logits.topk(top_k, dim=-1).indices
        scores[l] = (top == tokens.to(top.device)[None, :, None]).any(-1).float().mean(-1).cpu()
    return HeadScores(kind="copying", scores=scores, chance=top_k / cfg.vocab_size, title="copying scores")
