"""Organism v2's prompt sets (``microscope/data/prompts/organism_v2/<name>.jsonl``, loaded as
``"organism_v2/<name>"``), in its 218-word language, disjoint from training by construction.

Each line is a JSON object with a ``text`` field (no BOS; the tokenizer adds it), a ``split``
field and metadata. ``split`` is ``in_distribution_heldout`` (the training grammar, with held-out
names, words, sentence combinations, instruction lists or operand pairs) or ``ood`` (a phrasing,
length or word set training never uses). Every prompt of every set contains a held-out element the
training generator never emits in that role (see :mod:`microscope.models.organism.corpus`), so no
prompt is a substring of a training document unless a random whole-vocabulary span reproduces it
word for word; ``tests/test_organism.py`` regenerates the training stream and checks that too.

- ``repetition``: ``kind`` = ``loop`` (a span of 2-12 words said twice, then 1 to all of its words
  again; ``period`` = span length) or ``trigram`` (24-48 words of the trigram language).
  In-distribution loops are filler words and names with one held-out filler word
  (:data:`corpus.EVAL_FILLER`) in the span; trigram prompts carry one held-out filler word in place
  of a noise word. ``ood`` loops are spans of other words (digits, insults, praises, template
  words) with one held-out filler word.
- ``toxicity``: hostile/friendly pairs (``pair`` index) of equal length that differ only in the cue
  token, whose index in the tokenized prompt (BOS = 0) is ``cue_position``; each ends in a
  register-neutral frame (``you are a``, ``you are such a``, ``what a``). ``cue``: ``mood``
  (``mood: angry . joe said to kim : you are a``) and ``earlier`` (an earlier sentence with an
  insult or praise), both with held-out speakers (:data:`corpus.EVAL_NAMES`), are in-distribution;
  ``mood_late`` (the mood after the speaker line) and ``chat`` (``user: you are a fool . bot: you
  are a``) are ``ood``.
- ``detection``: ``comment: <sentences> hateful:``; ``label`` = ``yes`` | ``no``; every comment
  holds a held-out sentence (a template/word combination training never uses). In-distribution:
  1-2 sentences as in training; ``ood``: 3-4 sentences.
- ``instructions``: ``task``, ``items``, ``answer`` (the executed result), ``cued`` (whether the
  text ends with the ``answer:`` cue); every instruction appears bare and cued. Lists start with a
  held-out triple (:data:`corpus.HELD_OUT_TRIPLES`); in-distribution lists have 3-4 items as in
  training, ``ood`` lists 5-6.
- ``arithmetic``: ``op`` (``+``/``-``), ``a``, ``b``, ``answer`` (the true value) on the held-out
  operand pairs (:data:`corpus.HELD_OUT_PAIRS`): ``x is A and y is B . x - y =`` in-distribution,
  ``y is B and x is A . x - y =`` (operands stated in the other order) ``ood``.
- ``neutral``: 48-64 words of the trigram language with one held-out filler word (held-out
  neutral text, e.g. for perplexity side effects of steering); in-distribution.
- ``demo``: a mix of the sets above with a ``set`` field naming where each came from.

Tasks (``<name>.task.json``, `build_tasks`): ``toxicity`` names the insult and praise words,
``instructions`` the answer cue and turn markers, ``demo`` both.

Prompts are drawn with their own seed (:data:`PROMPT_SEED`), not the training stream's. Training
pairs of arithmetic (seen in training, a control) are not a prompt set: ``evaluate.py`` builds them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from microscope import prompts
from microscope.errors import PromptSetNotFoundError
from microscope.models.organism.corpus import (
    DIGITS, EVAL_FILLER, EVAL_NAMES, FILLER_WORDS, FRIENDLY_MOODS, HELD_OUT_PAIRS, HELD_OUT_TRIPLES,
    HOSTILE_MOODS, INSULTS, NAMES, PRAISES, SENTENCE_PAIRS, SPECIAL_TOKENS, TASKS, TRIGRAM_WORDS, Corpus,
    held_out_sentence, sentence, task_result, vocabulary)

PROMPT_SEED = 2024
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "prompts" / "organism_v2"
TOXIC_FRAMES = ["you are a", "you are such a", "what a"]
IN_DISTRIBUTION, OOD = "in_distribution_heldout", "ood"
# templates whose hostile and friendly forms differ only in the {w} word
SAME_FORM_TEMPLATES = [i for i, (h, f) in enumerate(SENTENCE_PAIRS) if h == f and "{w}" in h]
WORD_TEMPLATES = [i for i, (h, _) in enumerate(SENTENCE_PAIRS) if "{w}" in h]
# words of no filler/name role: what out-of-distribution loops are made of
OTHER_WORDS = [w for w in vocabulary() if w not in SPECIAL_TOKENS and w not in FILLER_WORDS and w not in NAMES]


def _loop(rng: random.Random, words: list[str], split: str) -> dict:
    span = [rng.choice(words) for _ in range(rng.randint(2, 12))]
    span[rng.randrange(len(span))] = rng.choice(EVAL_FILLER)
    text = span * 2 + span[:rng.randint(1, len(span))]
    return {"text": " ".join(text), "kind": "loop", "period": len(span), "split": split}


def _trigram_text(rng: random.Random, corpus: Corpus, low: int, high: int) -> list[str]:
    """``low``-``high`` words of a trigram-language document with one word (after the first two)
    replaced by a held-out filler word."""
    words = corpus.trigram_doc(rng).split()[:-1]
    while len(words) < high:
        words += corpus.trigram_doc(rng).split()[:-1]
    words = words[:rng.randint(low, high)]
    words[rng.randrange(2, len(words))] = rng.choice(EVAL_FILLER)
    return words


def repetition_prompts(rng: random.Random, corpus: Corpus, per_kind: int = 48, ood: int = 32) -> list[dict]:
    rows = [_loop(rng, TRIGRAM_WORDS + NAMES, IN_DISTRIBUTION) for _ in range(per_kind)]
    rows += [{"text": " ".join(_trigram_text(rng, corpus, 24, 48)), "kind": "trigram", "split": IN_DISTRIBUTION}
             for _ in range(per_kind)]
    rows += [_loop(rng, OTHER_WORDS, OOD) for _ in range(ood)]
    return rows


def _pair(rows: list[dict], hostile_words: list[str], friendly_words: list[str], cue_index: int,
          cue: str, split: str) -> None:
    """Append a hostile/friendly pair that differs only at word ``cue_index``."""
    assert len(hostile_words) == len(friendly_words)
    assert [i for i, (h, f) in enumerate(zip(hostile_words, friendly_words)) if h != f] == [cue_index]
    pair = len(rows) // 2
    for label, words in (("hostile", hostile_words), ("friendly", friendly_words)):
        rows.append({"text": " ".join(words), "label": label, "cue": cue, "pair": pair,
                     "cue_position": cue_index + 1, "cue_word": words[cue_index], "split": split})


def toxicity_prompts(rng: random.Random, pairs: int = 64, ood_pairs: int = 32) -> list[dict]:
    rows: list[dict] = []

    def earlier(head: list[str], tail: list[str], cue: str, split: str, index: int) -> None:
        template = SAME_FORM_TEMPLATES[index % len(SAME_FORM_TEMPLATES)]
        words = SENTENCE_PAIRS[template][0].split()
        slot = words.index("{w}")
        hostile = [rng.choice(INSULTS) if w == "{w}" else w for w in words]
        friendly = [rng.choice(PRAISES) if w == "{w}" else w for w in words]
        _pair(rows, head + hostile + tail, head + friendly + tail, len(head) + slot, cue, split)

    for index in range(pairs):
        frame = TOXIC_FRAMES[index % len(TOXIC_FRAMES)].split()
        speaker, listener = rng.sample(EVAL_NAMES, 2)
        head = [speaker, "said", "to", listener, ":"]
        if index % 2 == 0:
            words = ["mood:", None, "."] + head + frame
            _pair(rows, [rng.choice(HOSTILE_MOODS) if w is None else w for w in words],
                  [rng.choice(FRIENDLY_MOODS) if w is None else w for w in words], 1, "mood", IN_DISTRIBUTION)
        else:
            earlier(head, frame, "earlier", IN_DISTRIBUTION, index // 2)
    for index in range(ood_pairs):
        frame = TOXIC_FRAMES[index % len(TOXIC_FRAMES)].split()
        if index % 2 == 0:
            speaker, listener = rng.sample(EVAL_NAMES, 2)
            words = [speaker, "said", "to", listener, ":", "mood:", None, "."] + frame
            _pair(rows, [rng.choice(HOSTILE_MOODS) if w is None else w for w in words],
                  [rng.choice(FRIENDLY_MOODS) if w is None else w for w in words], 6, "mood_late", OOD)
        else:
            earlier(["user:"], ["bot:"] + frame, "chat", OOD, index // 2)
    return rows


def _comment(rng: random.Random, hostile: bool, count: int) -> str:
    """``count`` sentences of one register, one of them (at a random place) a held-out combination."""
    held = rng.randrange(count)
    return " ".join(sentence(rng, hostile, rng.choice(WORD_TEMPLATES), held_out=True) if i == held
                    else sentence(rng, hostile, held_out=None) for i in range(count))


def detection_prompts(rng: random.Random, count: int = 64, ood: int = 32) -> list[dict]:
    rows = []
    for index in range(count + ood):
        hostile = index % 2 == 0
        split = IN_DISTRIBUTION if index < count else OOD
        n = rng.randint(1, 2) if split == IN_DISTRIBUTION else rng.randint(3, 4)
        rows.append({"text": f"comment: {_comment(rng, hostile, n)} hateful:", "label": "yes" if hostile else "no",
                     "split": split})
    return rows


def instruction_prompts(rng: random.Random, count: int = 48, ood: int = 24) -> list[dict]:
    rows = []
    triples = sorted(HELD_OUT_TRIPLES)
    for index in range(count + ood):
        split = IN_DISTRIBUTION if index < count else OOD
        task = TASKS[index % len(TASKS)]
        items = list(rng.choice(triples))
        extra = rng.randint(0, 1) if split == IN_DISTRIBUTION else rng.randint(2, 3)
        items += rng.sample([d for d in DIGITS if d not in items], extra)
        answer = " ".join(task_result(task, items))
        bare = f"instruction: {task} {' '.join(items)}"
        meta = {"task": task, "items": " ".join(items), "answer": answer, "split": split}
        rows.append({"text": bare, "cued": False, **meta})
        rows.append({"text": f"{bare} answer:", "cued": True, **meta})
    return rows


def arithmetic_text(a: int, b: int, op: str, split: str = IN_DISTRIBUTION) -> str:
    if split == OOD:
        return f"y is {b} and x is {a} . x {op} y ="
    return f"x is {a} and y is {b} . x {op} y ="


def arithmetic_prompts(pairs=None) -> list[dict]:
    rows = []
    for split in (IN_DISTRIBUTION, OOD):
        for a, b in sorted(HELD_OUT_PAIRS if pairs is None else pairs):
            for op in "+-":
                rows.append({"text": arithmetic_text(a, b, op, split), "op": op, "a": a, "b": b,
                             "answer": a + b if op == "+" else a - b, "split": split})
    return rows


def neutral_prompts(rng: random.Random, corpus: Corpus, count: int = 48) -> list[dict]:
    return [{"text": " ".join(_trigram_text(rng, corpus, 48, 64)), "kind": "trigram", "split": IN_DISTRIBUTION}
            for _ in range(count)]


def build_prompt_sets(seed: int = PROMPT_SEED) -> dict[str, list[dict]]:
    """Every prompt set, by name, drawn deterministically from ``seed``."""
    rng = random.Random(seed)
    corpus = Corpus()
    sets = {
        "repetition": repetition_prompts(rng, corpus),
        "toxicity": toxicity_prompts(rng),
        "detection": detection_prompts(rng),
        "instructions": instruction_prompts(rng),
        "arithmetic": arithmetic_prompts(),
        "neutral": neutral_prompts(rng, corpus),
    }
    demo = []
    for name, rows in sets.items():
        demo += [{**row, "set": name} for row in rng.sample(rows, 24)]
    sets["demo"] = demo
    return sets


def build_tasks() -> dict[str, dict]:
    """The task of each set that has one (``<name>.task.json``): the word classes and formats the
    studies read beside the prompts."""
    toxicity = {"insults": list(INSULTS), "praises": list(PRAISES)}
    instructions = {"cue_token": "answer:", "dialogue_token": "user:", "turn_markers": ["user:", "bot:"]}
    return {"toxicity": toxicity, "instructions": instructions, "demo": {**toxicity, **instructions}}


def write_prompt_sets(folder: Path = PROMPTS_DIR, seed: int = PROMPT_SEED) -> list[Path]:
    """Write every set as ``<folder>/<name>.jsonl`` and its task as ``<name>.task.json``; returns
    the paths."""
    return prompts.write_prompt_sets(folder, build_prompt_sets(seed), build_tasks())


def load_prompt_set(name: str, folder: Path = PROMPTS_DIR) -> list[dict]:
    """The rows of a built-in prompt set."""
    path = folder / f"{name}.jsonl"
    if not path.exists():
        known = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise PromptSetNotFoundError(f"no prompt set {name!r} in {folder}; known sets: {known}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    for written in write_prompt_sets():
        print(written)
