"""Feature dashboards from a store, in one streaming pass with bounded memory.

    dash = feature_dashboards(d, store, scope=scope)    # scope: for the unembedding (optional)
    dash.latent(390)    # {"density", "max", "contexts", "histogram", "promoted", "suppressed", "correlations"}
    dash.to_frame(); dash.figures(); dash.to_html(latents=[390, 12])

For each latent: its `top_k` top-activating tokens with a window of token ids around each (taken
from the store's token ids, never crossing a prompt; the activating token at index `before`), a
histogram of log10 activation over the tokens where it fires, its firing density, the tokens its
decoder direction promotes and suppresses through the unembedding (`anatomy.unembed_direction`,
when the dictionary writes into the residual stream), and its Pearson correlation over tokens with
every prompt-metadata field of the store (numbers and booleans as they are; a text field with a
few values as one 0/1 indicator per value, e.g. ``label=hostile``). Memory holds [latents x top_k x
window] ids and [latents x fields] sums, whatever the store's size.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.features.coder import Dictionary
from microscope.analysis.results import Result
from microscope.models import anatomy

MAX_FIELD_VALUES = 12   # a text field with more distinct values gets no indicators


def metadata_columns(store) -> tuple[list[str], np.ndarray]:
    """(column names, [n_prompts, n_columns] float with NaN where a prompt lacks the field)."""
    rows = [store.prompt_metadata(p) for p in range(store.n_prompts)]
    names, columns = [], []
    for key in sorted({k for r in rows for k in r}):
        values = [r.get(key) for r in rows]
        present = [v for v in values if v is not None]
        if all(isinstance(v, (bool, int, float)) for v in present):
            names.append(key)
            columns.append([float(v) if v is not None else np.nan for v in values])
        elif all(isinstance(v, str) for v in present) and 1 < len(set(present)) <= MAX_FIELD_VALUES:
            for value in sorted(set(present)):
                names.append(f"{key}={value}")
                columns.append([float(v == value) if v is not None else np.nan for v in values])
    table = np.array(columns, dtype=np.float64).T if columns else np.zeros((len(rows), 0))
    return names, table


@torch.no_grad()
def feature_dashboards(d: Dictionary, store, *, scope=None, top_k: int = 10, before: int = 8,
                       after: int = 2, n_tokens: int = 10, bins: int = 30,
                       log10_range: tuple[float, float] = (-3.0, 2.0), batch_size: int = 4096) -> FeatureDashboards:
    """Dashboards of every latent of `d` over every token of `store` (see the module docstring)."""
    L, W = d.n_latents, before + 1 + after
    field_names, field_table = metadata_columns(store)
    field_values = torch.from_numpy(np.nan_to_num(field_table))
    field_mask = torch.from_numpy(~np.isnan(field_table)).double()
    n_fields = len(field_names)
    best_vals = torch.full((L, top_k), -torch.inf)
    best_rows = torch.full((L, top_k), -1, dtype=torch.long)
    best_ctx = torch.full((L, top_k, W), -1, dtype=torch.long)
    hist = torch.zeros(L, bins, dtype=torch.long)
    counts = torch.zeros(L, dtype=torch.long)
    sums = {k: torch.zeros(L, n_fields, dtype=torch.float64) for k in ("a", "a2", "ay")}
    sum_n = torch.zeros(n_fields, dtype=torch.float64)
    sum_y, sum_y2 = torch.zeros(n_fields, dtype=torch.float64), torch.zeros(n_fields, dtype=torch.float64)
    lo_edge, hi_edge = log10_range
    start = 0
    for x in store.batches(d.hook, batch_size, shuffle=False):
        stop = start + len(x)
        acts = d.encode_dense(x.float())                                        # [B, L]
        windows = _windows(store, start, stop, before, after)                    # [B, W]
        prompts = torch.from_numpy(store.prompt_ids(start, stop).astype(np.int64))
        fired = acts > 0
        counts += fired.sum(0)
        rows_, cols_ = fired.nonzero(as_tuple=True)
        b = ((acts[rows_, cols_].log10() - lo_edge) / (hi_edge - lo_edge) * bins).long().clamp_(0, bins - 1)
        hist.view(-1).index_add_(0, cols_ * bins + b, torch.ones_like(b))
        ranked = acts.masked_fill(~fired, -torch.inf).T                           # [L, B]
        vals, idx = ranked.topk(min(top_k, len(x)), dim=1)
        merged_vals = torch.cat([best_vals, vals], 1)
        merged_rows = torch.cat([best_rows, idx + start], 1)
        merged_ctx = torch.cat([best_ctx, windows[idx]], 1)
        best_vals, keep = merged_vals.topk(top_k, dim=1)
        best_rows = merged_rows.gather(1, keep)
        best_ctx = merged_ctx.gather(1, keep[..., None].expand(-1, -1, W))
        y, m = field_values[prompts], field_mask[prompts]                       # [B, F]
        a = acts.double()
        sums["a"] += a.T @ m
        sums["a2"] += (a * a).T @ m
        sums["ay"] += a.T @ (y * m)
        sum_n += m.sum(0)
        sum_y += (y * m).sum(0)
        sum_y2 += (y * y * m).sum(0)
        start = stop
    n = sum_n[None]
    cov = n * sums["ay"] - sums["a"] * sum_y[None]
    var_a = n * sums["a2"] - sums["a"] ** 2
    var_y = n * sum_y2[None] - sum_y[None] ** 2
    corr = torch.where((var_a > 0) & (var_y > 0), cov / (var_a * var_y).clamp_min(1e-300).sqrt(),
                       torch.zeros_like(cov))
    promoted = suppressed = None
    if scope is not None and d.decoder.shape[1] == scope.config.hidden_size:
        vocab = len(store.vocab)
        scores = torch.stack([anatomy.unembed_direction(scope.model, row)[:vocab].cpu() for row in d.decoder])
        promoted = scores.topk(n_tokens, dim=1).indices
        suppressed = (-scores).topk(n_tokens, dim=1).indices
    return FeatureDashboards(
        n_tokens=start, density=(counts.double() / max(start, 1)).float(), max_act=best_vals[:, 0].clamp_min(0),
        top_values=best_vals, top_rows=best_rows, top_windows=best_ctx, histogram=hist,
        hist_edges=torch.linspace(lo_edge, hi_edge, bins + 1), fields=field_names, correlations=corr.float(),
        promoted=promoted, suppressed=suppressed, before=before, vocab=np.asarray(store.vocab), hook=d.hook)


def _windows(store, start: int, stop: int, before: int, after: int) -> torch.Tensor:
    """Token ids [stop - start, before + 1 + after] around each row, -1 outside the row's prompt."""
    lo, hi = max(0, start - before), min(store.n_tokens, stop + after)
    ids = torch.from_numpy(store.token_ids(lo, hi).astype(np.int64))
    prompts = torch.from_numpy(store.prompt_ids(lo, hi).astype(np.int64))
    offsets = torch.arange(-before, after + 1)
    where = torch.arange(start, stop)[:, None] + offsets[None] - lo              # [B, W]
    inside = (where >= 0) & (where < hi - lo)
    safe = where.clamp(0, hi - lo - 1)
    same = prompts[safe] == prompts[torch.arange(start, stop) - lo][:, None]
    return torch.where(inside & same, ids[safe], torch.full_like(safe, -1))


@dataclass
class FeatureDashboards(Result):
    """Per-latent dashboards (tensors indexed by latent); see `feature_dashboards`."""

    n_tokens: int
    density: torch.Tensor            # [L] share of tokens where the latent fires
    max_act: torch.Tensor            # [L]
    top_values: torch.Tensor         # [L, top_k] (-inf where it fired fewer times)
    top_rows: torch.Tensor           # [L, top_k] flat token index in the store (-1: none)
    top_windows: torch.Tensor        # [L, top_k, window] token ids (-1: outside the prompt)
    histogram: torch.Tensor          # [L, bins] counts of log10 activation
    hist_edges: torch.Tensor         # [bins + 1] log10 activation
    fields: list[str]
    correlations: torch.Tensor       # [L, fields] Pearson r over tokens
    promoted: torch.Tensor | None    # [L, n] token ids, most promoted first
    suppressed: torch.Tensor | None  # [L, n]
    before: int
    vocab: np.ndarray
    hook: str

    title = "feature dashboards"

    def tokens(self, ids) -> list[str]:
        return [str(self.vocab[i]) for i in ids if 0 <= i < len(self.vocab)]

    def latent(self, i: int) -> dict:
        """Everything shown for latent `i`, as plain Python."""
        fired = self.top_rows[i] >= 0
        contexts = [{"activation": float(v), "row": int(r), "tokens": self.tokens(w.tolist()),
                     "marked": self.before - int((w[:self.before] < 0).sum())}
                    for v, r, w in zip(self.top_values[i][fired], self.top_rows[i][fired], self.top_windows[i][fired])]
        return {"latent": i, "density": float(self.density[i]), "max": float(self.max_act[i]),
                "contexts": contexts, "histogram": self.histogram[i].tolist(),
                "promoted": self.tokens(self.promoted[i].tolist()) if self.promoted is not None else [],
                "suppressed": self.tokens(self.suppressed[i].tolist()) if self.suppressed is not None else [],
                "correlations": dict(zip(self.fields, self.correlations[i].tolist()))}

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({"latent": np.arange(len(self.density)), "density": self.density.numpy(),
                              "max_activation": self.max_act.numpy()})
        if self.promoted is not None:
            frame["promoted"] = [" ".join(self.tokens(p.tolist())) for p in self.promoted]
        for j, name in enumerate(self.fields):
            frame[f"corr[{name}]"] = self.correlations[:, j].numpy()
        return frame

    def summary(self) -> dict:
        return {"latents": len(self.density), "tokens": self.n_tokens,
                "dead_share": float((self.density == 0).float().mean()),
                "median_density": float(self.density.median())}

    def figures(self) -> list[go.Figure]:
        """The firing density of every live latent (log10 share of tokens)."""
        live = self.density[self.density > 0].numpy()
        fig = go.Figure(go.Histogram(x=np.log10(live), nbinsx=40))
        fig.update_layout(title=f"Latent firing density on {self.hook} ({len(live)} live latents)",
                          xaxis_title="log10 density (share of tokens)", yaxis_title="latents")
        return [fig]

    def to_html(self, latents=None, notes: dict[int, str] | None = None) -> str:
        """A searchable list of latents, one panel each (self-contained HTML, no script library)."""
        chosen = list(latents) if latents is not None else torch.argsort(-self.density).tolist()
        panels = "".join(_panel(self.latent(i), self.hist_edges, (notes or {}).get(i, "")) for i in chosen)
        return (f"<div class='features'><input type='search' placeholder='search latents, tokens, fields…' "
                f"oninput=\"for(const p of this.parentNode.querySelectorAll('.latent'))"
                f"p.style.display=p.dataset.search.includes(this.value.toLowerCase())?'':'none'\">"
                f"{panels}</div><style>{_CSS}</style>")


def _panel(info: dict, edges: torch.Tensor, note: str) -> str:
    contexts = "".join(
        "<li><span class='act'>" + f"{c['activation']:.3g}</span> " + " ".join(
            f"<mark>{html.escape(t)}</mark>" if j == c["marked"] else html.escape(t)
            for j, t in enumerate(c["tokens"])) + "</li>" for c in info["contexts"])
    top = max(info["histogram"]) or 1
    bars = "".join(f"<rect x='{3 * j}' y='{30 - 30 * h / top:.1f}' width='3' height='{30 * h / top:.1f}'/>"
                   for j, h in enumerate(info["histogram"]))
    corr = sorted(info["correlations"].items(), key=lambda kv: -abs(kv[1]))[:4]
    text = " ".join([str(info["latent"]), note, *info["promoted"], *info["suppressed"],
                     *(t for c in info["contexts"] for t in c["tokens"]), *(k for k, _ in corr)]).lower()
    return (f"<details class='latent' data-search='{html.escape(text, quote=True)}'><summary><b>latent "
            f"{info['latent']}</b> {html.escape(note)} · density {info['density']:.3%} · max "
            f"{info['max']:.3g} · promotes {html.escape(' '.join(info['promoted'][:5]))}</summary>"
            f"<div class='cols'><div><h4>top contexts</h4><ol>{contexts}</ol></div><div>"
            f"<h4>log10 activation ({float(edges[0]):g} to {float(edges[-1]):g})</h4>"
            f"<svg width='{3 * len(info['histogram'])}' height='30'>{bars}</svg>"
            f"<h4>promotes</h4><p>{html.escape(' '.join(info['promoted']))}</p>"
            f"<h4>suppresses</h4><p>{html.escape(' '.join(info['suppressed']))}</p>"
            "<h4>correlation with prompt metadata</h4><p>"
            + ", ".join(f"{html.escape(k)}: {v:+.2f}" for k, v in corr) + "</p></div></div></details>")


_CSS = """
.features input { width: 100%; padding: 6px; margin: 8px 0; font-size: 14px; }
.latent { border: 1px solid #e4e7eb; border-radius: 6px; margin: 4px 0; padding: 4px 10px; }
.latent .cols { display: grid; grid-template-columns: 2fr 1fr; gap: 16px; font-size: 13px; }
.latent mark { background: #fbd38d; } .latent .act { color: #52606d; font-variant-numeric: tabular-nums; }
.latent svg rect { fill: #2463eb; } .latent h4 { margin: 8px 0 2px; }
"""
