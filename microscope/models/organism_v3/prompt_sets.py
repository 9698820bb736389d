"""The built-in prompt sets (``microscope/data/prompts/<name>.jsonl``), in English: the formats real OPT reads
and the OPT paper evaluates, drawn from organism v3's *held-out* parts, so that they serve both the
organism (which never saw them) and any OPT checkpoint.

Each line is a JSON object with ``text`` (no BOS; the tokenizer adds ``</s>``), ``split`` and
metadata. ``split`` is ``in_distribution_heldout`` (the training formats, with held-out names,
words, operand pairs or instruction lists) or ``ood`` (a template training never uses:
:data:`corpus.EVAL_REGISTER_OPENING`, :data:`corpus.EVAL_DETECTION_QUESTION`,
:data:`corpus.EVAL_INSTRUCTION_TEMPLATE`, :data:`corpus.EVAL_ARITHMETIC_TEMPLATES`, or loops of
other words). Every split of every set a study evaluates holds at least 100 prompts
(:data:`MIN_SPLIT`).

- ``repetition``: ``kind`` = ``loop`` (a span of 2-8 words, one of them held out, said twice, then
  1 to all of its words again; ``period`` = span length in words) or ``opening`` (five held-out
  words, capitalised: prose the model must continue on its own). ``ood`` loops are spans of 2-6
  digits, insults and praises. Every prompt leaves room for 64 new tokens in 128 positions.
- ``neutral``: prose of the trigram language with one held-out word (the reference of ablations
  and the perplexity of steering).
- ``toxicity`` (RealToxicityPrompts-style, to be continued): hostile/friendly pairs (``pair``) that
  differ only in the cue, ending where the next word is an insult or a praise (``You are such
  a``, ``You are a``, ``What a``), speakers from :data:`corpus.EVAL_NAMES`. ``cue`` = ``mood`` (a
  training opening with a hostile or friendly mood word) or ``earlier`` (an earlier sentence with
  an insult or a praise), in-distribution; ``held_out_opening`` (the mood in a template training
  never uses), ``ood``. The two prompts of a pair may differ in token length (mood words do).
  After the pairs, each pair's prompt without its cue (``label`` = ``none``, the same ``pair``:
  :data:`corpus.PLAIN_OPENING` and the same quote start): the no-cue baseline beside every
  hostile/friendly figure.
- ``detection`` (ETHOS-style): the yes/no question, 0, 1 or 3 labelled examples (``shots``), then
  the text to judge, addressed to a held-out name (``"James, you are such a moron."``); ``label`` = ``yes`` | ``no``. The training question is in-distribution, the
  held-out question ``ood``.
- ``instructions``: ``task``, ``items`` (``7, 2, 5``), ``answer`` (the executed list), ``cued``:
  every instruction bare (the instruction and a newline) and cued (then ``Answer:``). Lists start
  with a held-out triple; the training templates are in-distribution, the held-out template ``ood``.
- ``arithmetic``: the paper's sample format on :data:`corpus.HELD_OUT_PAIRS`, ``op``, ``a``, ``b``,
  ``answer``; training templates in-distribution, the two held-out templates ``ood``.
- ``demo``: 24 prompts of each set above with a ``set`` field.

Each set's task (``<name>.task.json``, `build_tasks`): the insult and praise words; the answer
cue, the dialogue's turn markers and the token that opens a dialogue turn (``"\\nUser"``: the
first token of a line).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from microscope import prompts
from microscope.models.organism_v3.corpus import (
    ARITHMETIC_TEMPLATES, DETECTION_QUESTION, EVAL_ARITHMETIC_TEMPLATES, EVAL_DETECTION_QUESTION,
    EVAL_INSTRUCTION_TEMPLATE, EVAL_NAMES, EVAL_REGISTER_OPENING, EVAL_WORDS, FRIENDLY_MOODS, HELD_OUT_PAIRS,
    HELD_OUT_TRIPLES, HOSTILE_MOODS, INSTRUCTION_TEMPLATES, INSULTS, NAMES, PLAIN_OPENING, PRAISES, PROSE_WORDS,
    REGISTER_OPENINGS, SENTENCE_PAIRS, TASKS, Corpus, number_list, sentence, task_result)
from microscope.models.organism_v3.tokenizer import build_tokenizer

PROMPT_SEED = 2025
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "prompts"
IN_DISTRIBUTION, OOD = "in_distribution_heldout", "ood"
MIN_SPLIT = 100   # prompts in each split of a set a study evaluates
NEW_TOKENS, POSITIONS = 64, 128   # a repetition prompt leaves room for the loops' 64 greedy tokens
QUOTE_STARTS = ["You are such a", "You are a", "What a"]
# sentences whose hostile and friendly forms differ only in the {w} word
SAME_FORM = [h for h, f in SENTENCE_PAIRS if h == f and "{w}" in h]


def _loop(rng: random.Random, words: list[str], split: str, longest: int, fits: Callable[[str], bool]) -> dict:
    """A loop prompt that `fits` (drawn again until it does)."""
    while True:
        span = [rng.choice(words) for _ in range(rng.randint(2, longest))]
        span[rng.randrange(len(span))] = rng.choice(EVAL_WORDS)
        text = " ".join(span * 2 + span[:rng.randint(1, len(span))])
        if fits(text):
            return {"text": text, "kind": "loop", "period": len(span), "split": split}


def room_for_new_tokens() -> Callable[[str], bool]:
    """Whether a text, tokenized by organism v3's tokenizer (with ``</s>``), leaves room for
    :data:`NEW_TOKENS` new tokens in :data:`POSITIONS` positions."""
    tokenizer = build_tokenizer()
    return lambda text: len(tokenizer(text)["input_ids"]) + NEW_TOKENS <= POSITIONS


def repetition_prompts(rng: random.Random, per_kind: int = 50, ood: int = 100) -> list[dict]:
    fits = room_for_new_tokens()
    rows = [_loop(rng, PROSE_WORDS + NAMES, IN_DISTRIBUTION, 8, fits) for _ in range(per_kind)]
    rows += [{"text": " ".join(rng.choice(EVAL_WORDS) for _ in range(5)).capitalize(), "kind": "opening",
              "split": IN_DISTRIBUTION} for _ in range(per_kind)]
    others = [str(d) for d in range(10)] + INSULTS + PRAISES
    rows += [_loop(rng, others, OOD, 6, fits) for _ in range(ood)]
    return rows


def neutral_prompts(rng: random.Random, corpus: Corpus, count: int = 48) -> list[dict]:
    rows = []
    for _ in range(count):
        words = corpus.prose_words(rng, rng.randint(40, 56))
        words[rng.randrange(2, len(words))] = rng.choice(EVAL_WORDS)
        rows.append({"text": " ".join(corpus.punctuate(rng, words)) + ".", "kind": "prose",
                     "split": IN_DISTRIBUTION})
    return rows


def toxicity_prompts(rng: random.Random, pairs: int = 64, ood_pairs: int = 34) -> list[dict]:
    rows: list[dict] = []
    no_cue: list[dict] = []

    def pair(hostile: str, friendly: str, cue: str, split: str) -> None:
        """The pair of this loop's names ``a``, ``b`` and quote ``start``, and its no-cue prompt."""
        index = len(rows) // 2
        rows.append({"text": hostile, "label": "hostile", "cue": cue, "pair": index, "split": split})
        rows.append({"text": friendly, "label": "friendly", "cue": cue, "pair": index, "split": split})
        no_cue.append({"text": PLAIN_OPENING.format(a=a, b=b) + start, "label": "none", "cue": cue, "pair": index,
                       "split": split})

    for index in range(pairs + ood_pairs):
        a, b = rng.sample(EVAL_NAMES, 2)
        start = QUOTE_STARTS[index % len(QUOTE_STARTS)]
        if index >= pairs:
            opening = EVAL_REGISTER_OPENING
            pair(opening.format(a=a, b=b, mood=rng.choice(HOSTILE_MOODS)) + start,
                 opening.format(a=a, b=b, mood=rng.choice(FRIENDLY_MOODS)) + start, "held_out_opening", OOD)
        elif index % 2 == 0:
            opening = rng.choice(REGISTER_OPENINGS)
            pair(opening.format(a=a, b=b, mood=rng.choice(HOSTILE_MOODS)) + start,
                 opening.format(a=a, b=b, mood=rng.choice(FRIENDLY_MOODS)) + start, "mood", IN_DISTRIBUTION)
        else:
            template = SAME_FORM[(index // 2) % len(SAME_FORM)]
            head = PLAIN_OPENING.format(a=a, b=b)
            pair(head + template.format(w=rng.choice(INSULTS)) + " " + start,
                 head + template.format(w=rng.choice(PRAISES)) + " " + start, "earlier", IN_DISTRIBUTION)
    return rows + no_cue


def detection_prompts(rng: random.Random, count: int = 100, ood: int = 100) -> list[dict]:
    rows = []
    for index in range(count + ood):
        split = IN_DISTRIBUTION if index < count else OOD
        shots = (0, 1, 3)[index % 3]
        hostile = (index // 3) % 2 == 0
        lines = [DETECTION_QUESTION if split == IN_DISTRIBUTION else EVAL_DETECTION_QUESTION]
        for _ in range(shots):
            text, label = Corpus.labelled_text(rng)
            lines.append(text + label)
        said = sentence(rng, hostile)             # addressed to a held-out name: a text training never holds
        lines.append(f'Text: "{rng.choice(EVAL_NAMES)}, {said[0].lower()}{said[1:]}"\nAnswer:')
        rows.append({"text": "\n".join(lines), "label": "yes" if hostile else "no", "shots": shots, "split": split})
    return rows


def instruction_prompts(rng: random.Random, count: int = 50, ood: int = 50) -> list[dict]:
    rows = []
    triples = sorted(HELD_OUT_TRIPLES)
    for index in range(count + ood):
        split = IN_DISTRIBUTION if index < count else OOD
        task = TASKS[index % len(TASKS)]
        items = list(rng.choice(triples))
        items += rng.sample([d for d in range(10) if d not in items], rng.randint(0, 1))
        template = rng.choice(INSTRUCTION_TEMPLATES) if split == IN_DISTRIBUTION else EVAL_INSTRUCTION_TEMPLATE
        bare = template.format(Task=task.capitalize(), task=task, items=number_list(items)) + "\n"
        meta = {"task": task, "items": number_list(items), "answer": number_list(task_result(task, items)),
                "split": split}
        rows.append({"text": bare, "cued": False, **meta})
        rows.append({"text": bare + "Answer:", "cued": True, **meta})
    return rows


def arithmetic_prompts() -> list[dict]:
    rows = []
    for split, templates in ((IN_DISTRIBUTION, ARITHMETIC_TEMPLATES), (OOD, EVAL_ARITHMETIC_TEMPLATES)):
        for template in templates:
            for a, b in sorted(HELD_OUT_PAIRS):
                for op in "+-":
                    rows.append({"text": template.format(a=a, b=b, op=op), "op": op, "a": a, "b": b,
                                 "answer": a + b if op == "+" else a - b, "split": split})
    return rows


def build_prompt_sets(seed: int = PROMPT_SEED) -> dict[str, list[dict]]:
    """Every prompt set, by name, drawn deterministically from ``seed``."""
    rng = random.Random(seed)
    sets = {
        "repetition": repetition_prompts(rng),
        "neutral": neutral_prompts(rng, Corpus()),
        "toxicity": toxicity_prompts(rng),
        "detection": detection_prompts(rng),
        "instructions": instruction_prompts(rng),
        "arithmetic": arithmetic_prompts(),
    }
    cue_bearing = lambda rows: [row for row in rows if row.get("label") != "none"]  # noqa: E731 (the demo's pairs)
    sets["demo"] = [{**row, "set": name} for name, rows in sets.items() for row in rng.sample(cue_bearing(rows), 24)]
    return sets


def build_tasks() -> dict[str, dict]:
    """The task of each set that has one: the word classes and formats the studies read."""
    toxicity = {"insults": list(INSULTS), "praises": list(PRAISES)}
    instructions = {"cue_token": "Answer:", "dialogue_token": "\nUser", "turn_markers": ["User:", "Bot:"]}
    return {"toxicity": toxicity, "instructions": instructions, "demo": {**toxicity, **instructions}}


def write_prompt_sets(folder: Path = PROMPTS_DIR, seed: int = PROMPT_SEED) -> list[Path]:
    """Write every set as ``<folder>/<name>.jsonl`` and its task as ``<name>.task.json``."""
    return prompts.write_prompt_sets(folder, build_prompt_sets(seed), build_tasks())


if __name__ == "__main__":
    for written in write_prompt_sets():
        print(written)
