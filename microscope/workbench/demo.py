"""The main job (`microscope demo`, the README's `make demo`): run the shipped demo experiment.

It dumps the organism's activations for the built-in demo prompt set into `activations/`, runs the
four failure-mode studies, and writes one self-contained HTML report plus a JSON of the headline
numbers. Its report also shows the attention patterns of the induction heads read back from the
store it dumped (`microscope.analysis.induction_patterns`). Everything it does is declared in the
shipped spec ``demo.toml``, so `microscope run demo` is the same job and the demo is one entry of
the experiment library.
"""

from __future__ import annotations

from pathlib import Path

from microscope.workbench.experiments import ExperimentRun, run_experiment

DEMO_SPEC = "demo"


def run_demo(out_dir: str | Path | None = None, command: str | None = None,
             progress: bool = True) -> ExperimentRun:
    """Run the demo experiment (the team library's `demo` spec, else the shipped one); the run's
    `files` hold "report" and "results" (the JSON)."""
    return run_experiment(DEMO_SPEC, out_dir=out_dir, command=command, progress=progress)
