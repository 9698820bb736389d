"""Every analysis that runs as one step of an experiment, in one list.

    from microscope.analysis.registry import ANALYSES
    ANALYSES["toxicity"].purpose        # one line: what it measures
    ANALYSES["toxicity"].load()         # the function, imported on first use: fn(scope, **params)

The workbench's steps (`workbench.experiments.STEPS`), `microscope experiments steps` and the
failure-mode studies (`analysis.studies.STUDIES`) all read this list; a new step is one entry here.
Each function takes the scope first and returns a `Result` (or a dict of them); it may take a
``store`` (the experiment's dump) and a ``progress`` callback (`analysis.progress`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Analysis:
    """One runnable step: its name in specs, its function as "module:function", what it is for, and
    whether it is one of the OPT paper's failure-mode studies."""

    name: str
    function: str
    purpose: str
    study: bool = False

    def load(self) -> Callable:
        """The function (imports its module)."""
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


ANALYSES: dict[str, Analysis] = {a.name: a for a in (
    Analysis("toxicity", "microscope.analysis.studies.toxicity:run_toxicity",
             "Where the hostile register is read, its cue heads, and steering against it.", study=True),
    Analysis("repetition", "microscope.analysis.studies.repetition:run_repetition",
             "How often greedy decoding loops, and whether ablating the induction heads breaks the loops.",
             study=True),
    Analysis("instructions", "microscope.analysis.studies.instructions:run_instructions",
             "Bare instructions draw a simulated dialogue: where the model decides, which component does it.",
             study=True),
    Analysis("arithmetic", "microscope.analysis.studies.arithmetic:run_arithmetic",
             "Where the answer of a sum appears, and where wrong subtraction answers come from.", study=True),
    Analysis("head_scores", "microscope.analysis.head_scores:pattern_head_scores",
             "Previous-token, duplicate-token and induction scores of every head."),
    Analysis("logit_lens", "microscope.analysis.lens:logit_lens",
             "Every residual-stream point read through the model's final path."),
    Analysis("induction_patterns", "microscope.analysis.induction_patterns:induction_patterns",
             "The attention patterns of the top induction heads, read from the experiment's store."),
    Analysis("circuit", "microscope.analysis.circuits.discovery:run_circuit",
             "A task's circuit at edge level: EAP-IG against exact patching, faithfulness, random-init control."),
    Analysis("features", "microscope.analysis.features.study:run_features_study",
             "Sparse dictionaries trained on the store: a latent for the hostile register, random-init control."),
    Analysis("graph", "microscope.analysis.graphs.study:run_attribution_graph",
             "One prompt's attribution graph over transcoders from the store: replacement and completeness "
             "scores, ablations that test it, random-init control."),
)}
