"""Analysis tools: each returns a `Result` with ``.summary()`` (dict), ``.figures()`` (plotly) and
``.to_frame()`` (pandas).

    from microscope import analysis as an
    an.logit_lens(scope, prompts)                                    # lens.py
    an.direct_logit_attribution(scope, prompts, target=" 3")         # attribution.py
    an.activation_patching(scope, clean, answer=" 3", wrong=" 4")    # patching.py
    an.attribution_patching(...); an.patching_agreement(act, attr)   # attribution_patching.py
    an.layer_probes(scope_or_store, prompts, labels)                 # probes.py
    an.pattern_head_scores(scope); an.copying_scores(scope)          # head_scores.py
    an.mean_difference_vector(...); an.steer_generate(...)           # steering.py

Names are imported on first use so that importing the package stays cheap. The studies and the
other analyses that run as experiment steps are listed in `microscope.analysis.registry`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Result": "results",
    "logit_lens": "lens", "unembed": "lens", "vocab_projection": "lens", "LensResult": "lens",
    "direct_logit_attribution": "attribution", "AttributionResult": "attribution",
    "activation_patching": "patching", "run_patched": "patching", "symmetric_corruption": "patching",
    "logit_diff": "patching", "PatchingResult": "patching",
    "attribution_patching": "attribution_patching", "patching_agreement": "attribution_patching",
    "PatchingAgreement": "attribution_patching",
    "layer_probes": "probes", "train_probes": "probes", "live_features": "probes",
    "store_features": "probes", "ProbeResult": "probes",
    "pattern_head_scores": "head_scores", "previous_token_scores": "head_scores",
    "duplicate_token_scores": "head_scores", "induction_scores": "head_scores",
    "copying_scores": "head_scores", "repeated_random_tokens": "head_scores", "HeadScores": "head_scores",
    "mean_difference_vector": "steering", "actadd_vector": "steering", "steer_generate": "steering",
    "SteeringVector": "steering",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"microscope.analysis.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'microscope.analysis' has no attribute {name!r}")
