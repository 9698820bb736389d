"""Plotly figure helpers shared by analysis results and reports.

Each function takes plain arrays (torch tensors or numpy) and labels and returns a
`plotly.graph_objects.Figure`; none of them computes anything about a model.

- `heatmap`: any 2-D grid (rows x columns), diverging colours centred on 0 by default;
- `layer_position_heatmap`: layers (or hook points) x token positions, tokens on the x axis;
- `head_grid`: a [layer, head] grid of per-head numbers;
- `attention_pattern`: one head's [query, key] pattern with the tokens on both axes;
- `line_plot`: one or more named series over a shared x axis (layers, coefficients, steps);
- `circuit_graph`: an edge-level circuit; `attribution_graph`: a pruned attribution graph laid out
  by token position and layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from microscope.errors import AnalysisInputError


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


def token_labels(tokens: Sequence[str]) -> list[str]:
    """Unique axis labels for possibly repeated tokens: ``"3:' the'"`` (position, repr)."""
    return [f"{i}:{t!r}" for i, t in enumerate(tokens)]


def heatmap(values, *, x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
            title: str = "", x_title: str = "", y_title: str = "", colorbar: str = "",
            diverging: bool = True, text: Sequence[Sequence[str]] | None = None) -> go.Figure:
    """A [rows, columns] heatmap; rows run top to bottom. `diverging` centres the colours on 0."""
    z = _numpy(values)
    if z.ndim != 2:
        raise AnalysisInputError(f"heatmap needs a 2-D array [rows, columns], got shape {z.shape}")
    extra = dict(colorscale="RdBu", zmid=0.0) if diverging else dict(colorscale="Viridis")
    trace = go.Heatmap(z=z, x=list(x_labels) if x_labels is not None else None,
                       y=list(y_labels) if y_labels is not None else None,
                       colorbar=dict(title=colorbar), hoverongaps=False, **extra)
    if text is not None:
        trace.update(text=[list(row) for row in text], texttemplate="%{text}")
    fig = go.Figure(trace)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def layer_position_heatmap(values, *, tokens: Sequence[str], layers: Sequence[str], title: str = "",
                           colorbar: str = "", diverging: bool = True,
                           text: Sequence[Sequence[str]] | None = None) -> go.Figure:
    """[layer, position] values with the prompt's tokens along x."""
    return heatmap(values, x_labels=token_labels(tokens), y_labels=list(layers), title=title,
                   x_title="position", y_title="layer", colorbar=colorbar, diverging=diverging,
                   text=text)


def head_grid(values, *, title: str = "", colorbar: str = "", diverging: bool = True) -> go.Figure:
    """[layer, head] values; hover shows L{layer}H{head}."""
    z = _numpy(values)
    return heatmap(z, x_labels=[f"H{h}" for h in range(z.shape[1])],
                   y_labels=[f"L{l}" for l in range(z.shape[0])], title=title,
                   x_title="head", y_title="layer", colorbar=colorbar, diverging=diverging)


def attention_pattern(pattern, *, tokens: Sequence[str], title: str = "") -> go.Figure:
    """One head's attention [query, key] (probabilities), tokens on both axes."""
    labels = token_labels(tokens)
    return heatmap(pattern, x_labels=labels, y_labels=labels, title=title, x_title="key",
                   y_title="query", colorbar="attention", diverging=False)


def line_plot(series: Mapping[str, Sequence[float]], *, x: Sequence | None = None, title: str = "",
              x_title: str = "", y_title: str = "", hline: float | None = None) -> go.Figure:
    """One line per named series over a shared x axis; `hline` draws a reference (e.g. chance)."""
    fig = go.Figure()
    for name, ys in series.items():
        ys = _numpy(ys)
        fig.add_trace(go.Scatter(x=list(x) if x is not None else list(range(len(ys))), y=ys,
                                 mode="lines+markers", name=name))
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dot", annotation_text=f"{hline:.3g}")
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


def circuit_graph(nodes: Mapping[str, tuple[float, float]], edges: Sequence[tuple[str, str, float, str]], *,
                  title: str = "") -> go.Figure:
    """Nodes at (x, y) and edges (sender, receiver, score, port): width by |score|, colour by the
    receiving port (q / k / v / in), solid for positive scores, dotted for negative ones."""
    colors = {"q": "royalblue", "k": "crimson", "v": "seagreen", "in": "grey"}
    top = max((abs(e[2]) for e in edges), default=1.0) or 1.0
    fig = go.Figure()
    for sender, receiver, score, port in edges:
        (x0, y0), (x1, y1) = nodes[sender], nodes[receiver]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", showlegend=False, hoverinfo="text",
                                 text=f"{sender} -> {receiver}.{port}: {score:.3g}",
                                 line=dict(width=1 + 7 * abs(score) / top, color=colors.get(port, "grey"),
                                           dash="solid" if score >= 0 else "dot")))
    fig.add_trace(go.Scatter(x=[p[0] for p in nodes.values()], y=[p[1] for p in nodes.values()],
                             mode="markers+text", text=list(nodes), textposition="top center",
                             marker=dict(size=10, color="black"), showlegend=False, hoverinfo="text"))
    for port, color in colors.items():
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color=color), name=port))
    fig.update_layout(title=title, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def attribution_graph(nodes: Sequence[Mapping], edges: Sequence[tuple[str, str, float]], *,
                      tokens: Sequence[str], n_layers: int, title: str = "") -> go.Figure:
    """A pruned attribution graph: nodes are dicts {"id", "kind" ("feature" | "error" | "token" |
    "logit"), "layer" (-1 for inputs, `n_layers` for logits), "pos", "label"} drawn at (token
    position, layer), nodes sharing a place spread side by side; edges (source id, target id,
    weight) drawn with width by |weight|, blue when positive, red when negative."""
    colors = {"feature": "#2463eb", "error": "#9aa5b1", "token": "#1f7a3f", "logit": "#d97706"}
    places: dict[tuple[int, int], list[Mapping]] = {}
    for node in nodes:
        places.setdefault((int(node["layer"]), int(node["pos"])), []).append(node)
    xy = {}
    for (layer, pos), group in places.items():
        for j, node in enumerate(group):
            xy[node["id"]] = (pos + 0.8 * ((j + 0.5) / len(group) - 0.5), layer)
    top = max((abs(w) for _, _, w in edges), default=1.0) or 1.0
    fig = go.Figure()
    for source, target, weight in edges:
        (x0, y0), (x1, y1) = xy[source], xy[target]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", showlegend=False, hoverinfo="skip",
                                 line=dict(width=0.5 + 5 * abs(weight) / top,
                                           color="rgba(36,99,235,0.45)" if weight >= 0 else "rgba(220,38,38,0.45)")))
    for kind, color in colors.items():
        chosen = [n for n in nodes if n["kind"] == kind]
        fig.add_trace(go.Scatter(x=[xy[n["id"]][0] for n in chosen], y=[xy[n["id"]][1] for n in chosen],
                                 mode="markers", name=kind, marker=dict(size=9, color=color),
                                 text=[n["label"] for n in chosen], hoverinfo="text"))
    fig.update_layout(title=title, xaxis=dict(tickmode="array", tickvals=list(range(len(tokens))),
                                              ticktext=token_labels(tokens), title="position"),
                      yaxis=dict(tickmode="array", tickvals=list(range(-1, n_layers + 1)),
                                 ticktext=["input", *[f"L{l}" for l in range(n_layers)], "logits"], title="layer"))
    return fig
