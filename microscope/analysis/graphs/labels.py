"""Feature labels from their dashboards: the tokens where a latent fires most, and what it promotes.

    labels = feature_labels(transcoders, store, [(2, 390), (3, 12)], scope=scope)
    labels[2, 390]      # "fires on ' bitter' ' livid' ' angry' | promotes ' idiot' ' fool'"

Each block's dashboards are `features.dashboards.feature_dashboards` of its transcoder over the
store (one streaming pass per block named); a label lists the activating token of the latent's
top `contexts` contexts and its top `promoted` tokens through the unembedding (given a scope).
"""

from __future__ import annotations

from collections.abc import Iterable

from microscope.analysis.features.dashboards import feature_dashboards
from microscope.analysis.graphs.transcoders import Transcoders


def feature_labels(transcoders: Transcoders, store, features: Iterable[tuple[int, int]], *, scope=None,
                   contexts: int = 3, promoted: int = 3) -> dict[tuple[int, int], str]:
    """{(layer, latent): label} for `features` (see the module docstring); a latent that never
    fires on the store is labelled "silent on the store"."""
    wanted: dict[int, set[int]] = {}
    for layer, latent in features:
        wanted.setdefault(int(layer), set()).add(int(latent))
    labels = {}
    for layer, latents in sorted(wanted.items()):
        dash = feature_dashboards(transcoders[layer], store, scope=scope, top_k=contexts)
        for latent in sorted(latents):
            info = dash.latent(latent)
            fires = list(dict.fromkeys(repr(c["tokens"][c["marked"]]) for c in info["contexts"]))
            text = "fires on " + " ".join(fires) if fires else "silent on the store"
            if info["promoted"]:
                text += " | promotes " + " ".join(repr(t) for t in info["promoted"][:promoted])
            labels[layer, latent] = text
    return labels
