"""Tuned lens (Belrose et al. 2023): one affine translator per layer, trained so that the layer's
residual stream, translated and read through the model's final path, matches the model's output.

    lens = fit_tuned_lens(scope, prompts)                 # from live runs
    lens = fit_tuned_lens(scope, store=ms.open_store(p))  # from a store's resid_pre/resid_post arrays
    result = logit_lens(scope, prompts, translate=lens.translate)   # lens.LensResult, tuned
    compare_lenses(scope, held_out, lens).figures()       # KL to the output by layer, both lenses

The translator of a point is ``h -> h + W h + b``. W, b start at zero (``init="identity"``: an
untrained tuned lens *is* the logit lens) or, by default, at the ridge least-squares map from the
point's rows to the output's residual, normalised as the final path sees it (``init=
"least_squares"``: a closed form, one d_model x d_model solve per point); Adam on the KL then
refines them. The closed-form start is what makes a fit affordable on a 50k vocabulary, where
every Adam step sends each point's rows through the whole unembedding (measured on organism v3's
held-out prompts: 20 steps of 64 tokens from it come within 0.4 nat of 100 steps of 256 tokens
from the identity at the embeddings and within 0.06 nat at every block; 20 steps from the
identity stay 1.3 nat away at the embeddings). The logits are ``unembed(translated)`` through
`models.anatomy.unembed`: in pre-LN the final LayerNorm then project_out and lm_head; in post-LN
(OPT-350m, which the tuned-lens project refuses) project_out and lm_head on the block outputs,
which are already normalised. The last block needs no translator (its lens is the output).
The loss is KL(output || lens) in nats per token, summed over points.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from microscope import names
from microscope.analysis.inputs import TextsOrIds, token_batch
from microscope.analysis.lens import residual_points
from microscope.analysis.results import Result
from microscope.errors import AnalysisInputError
from microscope.models.anatomy import final_norm, unembed
from microscope.viz.figures import line_plot


class TunedLens(nn.Module):
    """Translators for `points` (residual hook names, model order; the last block's output is read
    as it is). `translate(name, resid)` maps [..., d_model] to the translated residual."""

    def __init__(self, points: Sequence[str], d_model: int):
        super().__init__()
        self.points = list(points)
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in self.points[:-1])
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)

    def translate(self, name: str, resid: torch.Tensor) -> torch.Tensor:
        if name not in self.points:
            raise AnalysisInputError(f"the tuned lens has no translator for {name}; it reads {self.points}")
        index = self.points.index(name)
        if index == len(self.translators):
            return resid
        t = self.translators[index]
        x = resid.to(t.weight.device, t.weight.dtype)
        return x + t(x)

    def save(self, path: str | Path) -> Path:
        """Write the translators as safetensors with the point names in the metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"points": ",".join(self.points)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            points = f.metadata()["points"].split(",")
        state = load_file(str(path))
        lens = cls(points, state["translators.0.weight"].shape[0])
        lens.load_state_dict(state)
        return lens


def _kl(target_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || lens) per row, nats."""
    lens = logits.log_softmax(-1)
    return (target_logprobs.exp() * (target_logprobs - lens)).sum(-1)


def _live_rows(scope, prompts: TextsOrIds, points: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """{point: [tokens, d_model]} of every real (unpadded) token of `prompts`."""
    ids, mask = token_batch(scope, prompts)
    rows: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    for start in range(0, len(ids), batch_size):
        m = mask[start:start + batch_size].bool()
        _, cache = scope.run_with_cache(ids[start:start + batch_size], names=points, attention_mask=mask[start:start + batch_size])
        for p in points:
            rows[p].append(cache[p][m.to(cache[p].device)].float().cpu())
    return {p: torch.cat(v) for p, v in rows.items()}


def _rows_source(scope, prompts, store, points: list[str]):
    """Where the fit's rows come from: the store (checked for the points), or every real token's
    rows of live runs held in memory ({point: [tokens, d_model]})."""
    if store is None:
        return _live_rows(scope, prompts, points, batch_size=32)
    missing = [p for p in points if p not in store]
    if missing:
        raise AnalysisInputError(f"the store lacks {missing}; dump them with --hooks "
                                 f"'{names.act_name('resid_pre', 0)},{names.every_layer('resid_post')}'")
    return store


def _batches(source, points: list[str], batch_tokens: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of residual rows from `_rows_source`'s store or in-memory rows."""
    epoch = 0
    if not isinstance(source, dict):
        while True:
            yield from source.batches(points, batch_tokens, seed=seed + epoch)
            epoch += 1
    g = torch.Generator().manual_seed(seed)
    n = len(source[points[0]])
    while True:
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_tokens):
            yield {p: v[order[start:start + batch_tokens]] for p, v in source.items()}


def _output_space(model: nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """The last block's output [tokens, d_model] as the final path reads it: normalised without
    the norm's gain and bias in pre-LN (the lens applies the final LayerNorm to what it
    translates, so only the direction and centring of a translation matter), as it is in post-LN."""
    if final_norm(model) is None:
        return resid
    return nn.functional.layer_norm(resid, resid.shape[-1:])


@torch.no_grad()
def least_squares_start(lens: TunedLens, model: nn.Module, rows: dict[str, torch.Tensor], ridge: float = 1e-2) -> None:
    """Set each translator to the ridge least-squares affine map from its point's rows [tokens,
    d_model] to the output's rows in `_output_space`. The ridge is ``ridge`` times the mean
    variance of the point's features (a fraction of the signal, so one value suits every width)."""
    target = _output_space(model, rows[lens.points[-1]].double())
    t_mean = target.mean(0)
    for point, translator in zip(lens.points, lens.translators):
        x = rows[point].double()
        x_mean = x.mean(0)
        xc = x - x_mean
        gram = xc.T @ xc
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        a = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, xc.T @ (target - t_mean))  # x a ~ target
        translator.weight.copy_((a - eye).T)
        translator.bias.copy_(t_mean - x_mean @ a)


def fit_tuned_lens(scope, prompts: TextsOrIds | None = None, *, store=None, steps: int = 300,
                   lr: float = 1e-3, batch_tokens: int = 1024, seed: int = 0,
                   init: Literal["least_squares", "identity"] = "least_squares", init_tokens: int = 4096) -> TunedLens:
    """Train a tuned lens on `prompts` (live runs) or on `store` (an `ActivationStore` holding
    ``blocks.0.hook_resid_pre`` and every ``blocks.*.hook_resid_post``).

    The translators start at `least_squares_start` on the first ``init_tokens`` shuffled token
    rows (``init="identity"``: at zero, the logit lens), then Adam on the summed per-point KL to
    the model's output distribution (the last block's output through the final path); `steps`
    batches of `batch_tokens` token rows. The loss of every step is kept in ``lens.losses``."""
    if (prompts is None) == (store is None):
        raise AnalysisInputError("give prompts (live runs) or store=, not both")
    if init not in ("least_squares", "identity"):
        raise AnalysisInputError(f"init must be 'least_squares' or 'identity', got {init!r}")
    points = residual_points(scope)
    model = scope.model
    torch.manual_seed(seed)
    lens = TunedLens(points, model.config.hidden_size)
    source = _rows_source(scope, prompts, store, points)
    if init == "least_squares":
        least_squares_start(lens, model, next(_batches(source, points, init_tokens, seed)))
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr)
    batches = _batches(source, points, batch_tokens, seed)
    lens.losses = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:         # only the translators learn: no gradient into the unembedding
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            batch = next(batches)
            with torch.no_grad():
                target = unembed(model, batch[points[-1]].float()).log_softmax(-1)
            loss = sum(_kl(target, unembed(model, lens.translate(p, batch[p].float()))).mean()
                       for p in points[:-1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lens.losses.append(loss.item())
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return lens.eval().requires_grad_(False)


@dataclass(repr=False)
class LensComparison(Result):
    """Mean KL (nats per token) from each point's lens to the model output, for the logit lens and
    the tuned lens, on prompts the tuned lens was not fitted on.

    points: residual hook names; logit_kl, tuned_kl: float [point]."""

    points: list[str]
    logit_kl: torch.Tensor
    tuned_kl: torch.Tensor
    title: str = "logit lens vs tuned lens"

    @property
    def labels(self) -> list[str]:
        return ["embed" if i == 0 else f"L{i - 1}" for i in range(len(self.points))]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"point": self.points, "layer": self.labels,
                             "logit_lens_kl": self.logit_kl.tolist(), "tuned_lens_kl": self.tuned_kl.tolist()})

    def figures(self) -> list[go.Figure]:
        return [line_plot({"logit lens": self.logit_kl, "tuned lens": self.tuned_kl}, x=self.labels,
                          title="KL to the model output by layer (held-out prompts)",
                          x_title="layer", y_title="KL (nats/token)")]

    def summary(self) -> dict[str, float]:
        inner = slice(0, len(self.points) - 1)
        return {"logit_lens_mean_kl": float(self.logit_kl[inner].mean()),
                "tuned_lens_mean_kl": float(self.tuned_kl[inner].mean())}


@torch.no_grad()
def compare_lenses(scope, prompts: TextsOrIds, lens: TunedLens) -> LensComparison:
    """KL to the output at every point under both lenses, over every real token of `prompts`."""
    rows = _live_rows(scope, prompts, lens.points, batch_size=32)
    target = unembed(scope.model, rows[lens.points[-1]]).log_softmax(-1)
    logit_kl = torch.stack([_kl(target, unembed(scope.model, rows[p])).mean() for p in lens.points])
    tuned_kl = torch.stack([_kl(target, unembed(scope.model, lens.translate(p, rows[p]))).mean()
                            for p in lens.points])
    return LensComparison(points=lens.points, logit_kl=logit_kl, tuned_kl=tuned_kl)
