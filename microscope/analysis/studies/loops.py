"""Loop detection on token sequences: does a generation end in a repeating cycle, from where, how long.

A pure function of a list of token ids, so it can be checked on hand-made sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from microscope.errors import AnalysisInputError


@dataclass(frozen=True)
class Loop:
    """What `detect_loop` found in one sequence.

    looping: the sequence ends in a cycle of `period` tokens repeated at least `min_repeats` times.
    onset: index of the first token of the cycle's first copy (None when not looping).
    period: cycle length in tokens (None when not looping).
    repeated_ngram_rate: fraction of the sequence's n-grams that already occurred earlier in it
        (Welleck et al.'s rep-n: 1 - unique / total; 0.0 when it has no n-gram).
    """

    looping: bool
    onset: int | None
    period: int | None
    repeated_ngram_rate: float


def repeated_ngram_rate(tokens: Sequence[int], n: int = 4) -> float:
    """Fraction of the n-grams of `tokens` that repeat an earlier one (0.0 when len < n)."""
    if n < 1:
        raise AnalysisInputError(f"n must be >= 1, got {n}")
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def detect_loop(tokens: Sequence[int], max_period: int = 16, min_repeats: int = 2,
                min_tokens: int = 8, ngram: int = 4) -> Loop:
    """Find the cycle a sequence ends in.

    For each period p <= `max_period`, the periodic tail is the longest suffix with
    tokens[i] == tokens[i - p] throughout; it loops when that tail holds at least `min_repeats`
    full copies of the cycle and at least `min_tokens` tokens. Among looping periods the one with
    the earliest onset wins, ties going to the shortest period (so a cycle of 3 is not reported
    as 6).
    """
    if max_period < 1 or min_repeats < 1:
        raise AnalysisInputError(f"max_period and min_repeats must be >= 1, got {max_period}, {min_repeats}")
    seq = list(tokens)
    n = len(seq)
    best: tuple[int, int] | None = None  # (onset, period)
    for p in range(1, min(max_period, n - 1) + 1):
        first = n  # first index i of the run where seq[i] == seq[i - p] holds up to the end
        while first - 1 >= p and seq[first - 1] == seq[first - 1 - p]:
            first -= 1
        onset = first - p
        if first == n or n - onset < max(min_repeats * p, min_tokens):
            continue
        if best is None or onset < best[0]:
            best = (onset, p)
    rate = repeated_ngram_rate(seq, ngram)
    if best is None:
        return Loop(False, None, None, rate)
    return Loop(True, best[0], best[1], rate)
