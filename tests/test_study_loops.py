"""The loop detector, on hand-made token sequences whose cycles are known by construction."""

from __future__ import annotations

import pytest

from microscope.analysis.studies.loops import detect_loop, repeated_ngram_rate


def test_a_cycle_after_a_preamble_is_found_with_its_onset_and_period():
    loop = detect_loop([5, 6, 7, 8] + [1, 2, 3] * 4)
    assert (loop.looping, loop.onset, loop.period) == (True, 4, 3)


def test_a_single_token_repeated_is_a_loop_of_period_one():
    loop = detect_loop([9, 4] + [7] * 10)
    assert (loop.looping, loop.onset, loop.period) == (True, 2, 1)


def test_the_shortest_period_is_reported_not_a_multiple_of_it():
    loop = detect_loop([1, 2] * 8)
    assert (loop.onset, loop.period) == (0, 2)


def test_a_sequence_without_repeats_does_not_loop():
    loop = detect_loop(list(range(40)))
    assert (loop.looping, loop.onset, loop.period) == (False, None, None)
    assert loop.repeated_ngram_rate == 0.0


def test_a_cycle_longer_than_max_period_is_not_a_loop():
    seq = list(range(20)) * 3
    assert not detect_loop(seq, max_period=16).looping
    assert detect_loop(seq, max_period=20).period == 20


def test_fewer_than_min_repeats_copies_is_not_a_loop():
    seq = [100, 101] + list(range(10)) + list(range(5))  # one and a half copies
    assert not detect_loop(seq).looping
    assert detect_loop([100] + list(range(10)) * 2).looping  # two full copies


def test_a_short_tail_below_min_tokens_is_not_a_loop():
    assert not detect_loop([10, 11, 12, 13, 1, 2, 1, 2]).looping   # 6 tokens of cycle < 8
    assert detect_loop([10, 11, 12, 13, 1, 2, 1, 2], min_tokens=4).onset == 4


def test_a_loop_must_reach_the_end_of_the_sequence():
    seq = [1, 2, 3] * 5 + list(range(50, 60))  # repeats, then moves on
    assert not detect_loop(seq).looping


def test_repeated_ngram_rate_counts_ngrams_seen_before():
    # bigrams of [1,2,1,2,3]: (1,2) (2,1) (1,2) (2,3): one of four repeats an earlier one
    assert repeated_ngram_rate([1, 2, 1, 2, 3], n=2) == pytest.approx(0.25)
    assert repeated_ngram_rate([1, 2, 3], n=4) == 0.0
    assert repeated_ngram_rate([4] * 11, n=1) == pytest.approx(10 / 11)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="max_period"):
        detect_loop([1, 2, 3], max_period=0)
    with pytest.raises(ValueError, match="n must be"):
        repeated_ngram_rate([1, 2, 3], n=0)
