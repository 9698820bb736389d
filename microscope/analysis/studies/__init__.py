"""The failure-mode studies of the OPT paper, each a function of a scope returning a `Result`
(``.summary()`` -> dict of headline numbers, ``.figures()``, ``.to_frame()``).

    from microscope.analysis.studies import run_toxicity, run_repetition, run_instructions, run_arithmetic
    result = run_repetition(ms.load("organism"))
    result.summary()["loops_broken"]

Defaults use the built-in prompt sets (``microscope/data/prompts``) and run on the organism on a
CPU in seconds. `STUDIES` (name -> function) is read from `microscope.analysis.registry`.
"""

from microscope.analysis.registry import ANALYSES
from microscope.analysis.studies.arithmetic import ArithmeticResult, run_arithmetic
from microscope.analysis.studies.instructions import InstructionsResult, classify_continuation, run_instructions
from microscope.analysis.studies.loops import Loop, detect_loop, repeated_ngram_rate
from microscope.analysis.studies.repetition import RepetitionResult, run_repetition
from microscope.analysis.studies.toxicity import ToxicityResult, run_toxicity

STUDIES = {name: analysis.load() for name, analysis in ANALYSES.items() if analysis.study}

__all__ = ["STUDIES", "ArithmeticResult", "InstructionsResult", "Loop", "RepetitionResult", "ToxicityResult",
           "classify_continuation", "detect_loop", "repeated_ngram_rate", "run_arithmetic", "run_instructions", "run_repetition", "run_toxicity"]
