"""Logit lens: read every layer's residual stream through the model's own final path.

The final path (what the model does after its last block) differs between the two OPT layouts:

- pre-LN (every size but 350m): ``final_layer_norm`` -> ``project_out`` (only where
  ``word_embed_proj_dim != hidden_size``) -> ``lm_head``. The lens applies the final LayerNorm
  with *fresh* statistics of the residual it reads (the standard logit lens).
- post-LN (350m, ``do_layer_norm_before=False``): there is no final norm; every block already
  ends in its own ``final_layer_norm``, so ``hook_resid_post`` is a normalised vector and the
  lens is ``project_out`` -> ``lm_head``. The embeddings (``blocks.0.hook_resid_pre``) are the
  one unnormalised point in that layout; they are read through the same path, unnormalised.

In both layouts the lens at the last block's ``hook_resid_post`` *is* the model's logits.

    result = logit_lens(scope, ["x is 12, y is 9, x - y ="], position="last")
    result.token_prob(" 3")          # [point, batch, pos]: probability of " 3" at every layer
    result.heatmap(0)                # layer x position heatmap of the top-1 token (prompt 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.inputs import TextsOrIds, Tokens, decode_token, select_position, token_batch
from microscope.analysis.results import Result
from microscope.errors import AnalysisInputError
from microscope.models.anatomy import unembed, unembed_direction
from microscope.names import act_name, layer_names, parse, short_label
from microscope.viz.figures import layer_position_heatmap


def residual_points(scope) -> list[str]:
    """Default lens points: the embeddings, then each block's output."""
    return [act_name("resid_pre", 0)] + layer_names("resid_post", scope.model.config.num_hidden_layers)


def point_label(name: str) -> str:
    """A lens point's short label: 'embed' for the embeddings, 'L3' for block 3's output, else
    `names.short_label` ('L3.resid_mid')."""
    site, layer = parse(name)
    if name == act_name("resid_pre", 0):
        return "embed"
    return f"L{layer}" if site == "hook_resid_post" else short_label(name)


def vocab_projection(scope, direction: torch.Tensor, k: int = 10) -> pd.DataFrame:
    """The tokens a residual-space direction [d_model] promotes and suppresses most.

    Uses the linear part of the final path: in pre-LN the final LayerNorm's centring and gain
    (no 1/sigma: a direction has no scale of its own), then project_out and the unembedding.
    Returns a frame with columns rank, promoted, promoted_score, suppressed, suppressed_score."""
    scores = unembed_direction(scope.model, direction)
    top, bottom = scores.topk(k), (-scores).topk(k)
    decode = lambda ids: [decode_token(scope.tokenizer, i) for i in ids]  # noqa: E731
    return pd.DataFrame({"rank": range(1, k + 1), "promoted": decode(top.indices),
                         "promoted_score": top.values.tolist(), "suppressed": decode(bottom.indices),
                         "suppressed_score": (-bottom.values).tolist()})


@dataclass(repr=False)
class LensResult(Result):
    """Lens logits at every point (hook) and position.

    points: hook names read, in model order; logits: float32 [point, batch, pos, vocab];
    positions: LongTensor [batch, pos] of the token positions each column holds (all positions,
    or one per prompt with ``position="last"``); input_ids/attention_mask: [batch, T] as run;
    tokens: decoded strings of input_ids; model_logits: [batch, pos, vocab] (the real output)."""

    points: list[str]
    logits: torch.Tensor
    positions: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: list[list[str]]
    model_logits: torch.Tensor
    tokenizer: object = None
    title: str = "logit lens"

    @property
    def layers(self) -> list[str]:
        """Short point labels: 'embed', 'L0', 'L1', ... (see `point_label`)."""
        return [point_label(name) for name in self.points]

    def log_probs(self) -> torch.Tensor:
        return self.logits.log_softmax(-1)

    def probs(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    def _gather(self, values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        index = tokens.reshape(1, -1, 1, 1).expand(values.shape[0], -1, values.shape[2], 1)
        return values.gather(-1, index.to(values.device)).squeeze(-1)

    def token_logit(self, tokens: Tokens) -> torch.Tensor:
        """[point, batch, pos] lens logit of a token (id or one-token string), or one per prompt."""
        return self._gather(self.logits, self._ids(tokens))

    def token_prob(self, tokens: Tokens) -> torch.Tensor:
        """[point, batch, pos] lens probability of a token id (or one per prompt)."""
        return self._gather(self.probs(), self._ids(tokens))

    def token_rank(self, tokens: Tokens) -> torch.Tensor:
        """[point, batch, pos] rank of the token under the lens (0 = top-1)."""
        target = self.token_logit(tokens)[..., None]
        return (self.logits > target).sum(-1)

    def top_tokens(self) -> torch.Tensor:
        """LongTensor [point, batch, pos]: the lens's top-1 token."""
        return self.logits.argmax(-1)

    def decode(self, token_id: int) -> str:
        return decode_token(self.tokenizer, token_id)

    def _ids(self, tokens: Tokens) -> torch.Tensor:
        batch = self.logits.shape[1]
        if isinstance(tokens, str) or (isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str)):
            words = [tokens] if isinstance(tokens, str) else list(tokens)
            ids = [self.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
            if any(len(i) != 1 for i in ids):
                raise AnalysisInputError(f"{words} are not all single tokens ({ids}); pass token ids")
            tokens = [i[0] for i in ids]
        ids = torch.as_tensor(tokens).long().reshape(-1)
        return ids.expand(batch) if ids.numel() == 1 else ids

    def to_frame(self) -> pd.DataFrame:
        """One row per point x prompt x position: top-1 token and its probability."""
        probs = self.probs()
        top_p, top_id = probs.max(-1)
        rows = []
        for p, label in enumerate(self.layers):
            for b in range(self.logits.shape[1]):
                for j in range(self.logits.shape[2]):
                    pos = int(self.positions[b, j])
                    if pos < 0:
                        continue
                    rows.append(dict(point=self.points[p], layer=label, prompt=b, position=pos,
                                     token=self.tokens[b][pos], top_token=self.decode(int(top_id[p, b, j])),
                                     top_prob=float(top_p[p, b, j])))
        return pd.DataFrame(rows)

    def figures(self) -> list[go.Figure]:
        """The heatmap of the first prompt (`heatmap` draws any other)."""
        return [self.heatmap(0)]

    def heatmap(self, prompt: int = 0) -> go.Figure:
        """Layer x position heatmap of one prompt: colour = top-1 probability, text = top-1 token."""
        probs = self.probs()[:, prompt]
        top_p, top_id = probs.max(-1)
        keep = self.positions[prompt] >= 0
        cols = self.positions[prompt][keep].tolist()
        text = [[self.decode(int(i)) for i in row[keep]] for row in top_id]
        return layer_position_heatmap(top_p[:, keep], tokens=[self.tokens[prompt][c] for c in cols],
                                      layers=self.layers, title=f"logit lens (prompt {prompt})",
                                      colorbar="top-1 prob", diverging=False, text=text)

    def summary(self) -> dict:
        return {"points": len(self.points), "prompts": self.logits.shape[1], "positions": self.logits.shape[2]}


@torch.no_grad()
def logit_lens(scope, prompts: TextsOrIds, *, points: Sequence[str] | None = None,
               position: int | Literal["all", "last"] = "all", attention_mask: torch.Tensor | None = None,
               translate: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> LensResult:
    """Read residual-stream points through the final path (`anatomy.unembed`) at every position.

    prompts: texts or ids [batch, pos]; points: hook names or glob patterns of residual-shaped
    hooks (default `residual_points`: embeddings + every block's resid_post); position: "all"
    (every position; padded ones get position -1 in `.positions`), "last" or an int (one column
    per prompt, see `inputs.select_position`). translate: ``(point, resid) -> resid`` applied
    before the final path: a tuned lens's ``TunedLens.translate`` (`tuned_lens.py`)."""
    ids, mask = token_batch(scope, prompts, attention_mask)
    names = scope.resolve_names(list(points)) if points is not None else residual_points(scope)
    logits, cache = scope.run_with_cache(ids, names=names, attention_mask=mask)
    if position == "all":
        cols = torch.arange(ids.shape[1]).expand_as(ids).clone()
        cols[mask == 0] = -1
    else:
        cols = select_position(mask, position)[:, None]
    gather = cols.clamp(min=0)
    rows = torch.arange(ids.shape[0])[:, None]
    lens = []
    for name in names:
        act = cache[name]
        if act.shape[-1] != scope.model.config.hidden_size or act.ndim != 3:
            raise AnalysisInputError(f"{name} has shape {tuple(act.shape)}; the lens reads residual-stream "
                                     "hooks [batch, pos, d_model] (hook_resid_pre/mid/post)")
        resid = act[rows, gather.to(act.device)]
        if translate is not None:
            resid = translate(name, resid)
        lens.append(unembed(scope.model, resid).cpu())
    model_logits = logits.float().cpu()[rows, gather]
    tokens = [[decode_token(scope.tokenizer, t) for t in row] for row in ids]
    return LensResult(points=names, logits=torch.stack(lens), positions=cols, input_ids=ids,
                      attention_mask=mask, tokens=tokens, model_logits=model_logits,
                      tokenizer=scope.tokenizer)

