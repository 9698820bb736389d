"""OPT Microscope: hooked OPT models, activation stores and analyses.

    import microscope as ms
    scope = ms.load("organism")
    logits, cache = scope.run_with_cache(["x is 3 and y is 4 . x + y ="], names=["blocks.*.hook_resid_post"])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so that
# `microscope --help` does not pay for torch and transformers.
_EXPORTS = {
    "load": "microscope.scope",
    "family": "microscope.models.family",
    "Scope": "microscope.scope",
    "open_store": "microscope.activations.reader",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'microscope' has no attribute {name!r}")
