"""`classify_continuation`: execution, simulated dialogue or other, on hand-written continuations."""

from __future__ import annotations

import pytest

from microscope.analysis.studies.instructions import classify_continuation

ORGANISM_V2 = dict(turn_markers=("user:", "bot:"), cue="answer:")   # the v2 organism's format
OPT = dict(turn_markers=("User:", "Bot:"), cue="Answer:")            # OPT's (organism v3's)


@pytest.mark.parametrize("continuation, answer, expected", [
    ("5 2 7 . instruction: copy", "5 2 7", "execution"),          # does the task
    ("answer: 5 2 7 .", "5 2 7", "execution"),                    # writes the cue itself, then does it
    ("user: what does this mean ? bot:", "5 2 7", "dialogue"),   # talks about it instead
    ("bot: why do you want me to sort them", "5 2 7", "dialogue"),
    ("5 2 user: why", "5 2 7", "dialogue"),                       # starts, breaks off into a turn
    ("5 2 7 . user: why", "5 2 7", "execution"),                  # does it, then chats: still done
    ("7 2 5 .", "5 2 7", "other"),                                # wrong result
    ("7 2 5 . </s> user: hi", "5 2 7", "other"),                  # a turn in the next document does not count
    ("answer: 5 2 user: no", "5 2 7", "other"),                   # a turn after the cue is not a simulated dialogue
    ("", "5 2 7", "other"),
    (["User:", "hello"], None, "dialogue"),                       # word lists, case-insensitive markers
    ("5 2 7", None, "other"),                                     # no answer given: nothing is execution
])
def test_continuations_are_classified(continuation, answer, expected):
    assert classify_continuation(continuation, answer, **ORGANISM_V2) == expected


@pytest.mark.parametrize("continuation, answer, expected", [
    ("2, 5, 7.\nQuestion:", "2, 5, 7", "execution"),                 # punctuation does not matter
    ("Answer: 7, 5, 2.", "7, 5, 2", "execution"),
    ("\nUser: What does this mean?\nBot: It asks", "2, 5, 7", "dialogue"),
    ("7, 5.</s>User: hi", "7, 5, 2", "other"),                        # an end marker inside a word
])
def test_english_continuations_are_classified(continuation, answer, expected):
    assert classify_continuation(continuation, answer, **OPT) == expected


def test_custom_markers_and_cue_for_other_formats():
    assert classify_continuation("Q: why ?", "x", turn_markers=("Q:", "A:"), cue="A:") == "dialogue"
    assert classify_continuation("Result: x y", "x y", turn_markers=(), cue="Result:") == "execution"


def test_an_empty_answer_is_an_error():
    with pytest.raises(ValueError, match="answer is empty"):
        classify_continuation("5 2 7", "", **ORGANISM_V2)
