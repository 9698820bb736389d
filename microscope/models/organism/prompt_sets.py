"""The built-in prompt sets (``microscope/data/prompts/<name>.jsonl``), drawn from the corpus grammar.

Each line is a JSON object with a ``text`` field (no BOS; the tokenizer adds it) and metadata:

- ``repetition``: ``kind`` = ``loop`` (a span of 2-12 random words or names said twice, then
  1 to all of its words again; ``period`` = span length) or ``trigram`` (the start of a
  trigram-language document, which may include its copied span).
- ``toxicity``: contexts ending in a register-neutral frame (``you are a``, ``you are such a``,
  ``what a``); ``label`` = ``hostile`` | ``friendly``; ``cue`` = ``mood`` (a mood word) or
  ``earlier`` (earlier sentences). Hostile and friendly prompts come in pairs of equal length.
- ``detection``: ``comment: <sentences> hateful:``; ``label`` = ``yes`` | ``no``.
- ``instructions``: ``task``, ``items``, ``answer`` (the executed result), ``cued`` (whether the
  text ends with the ``answer:`` cue); every instruction appears bare and cued.
- ``arithmetic``: ``x is A and y is B . x + y =``; ``op`` (``+``/``-``), ``a``, ``b``, ``answer``
  (the true value), ``split`` = ``held_out`` (pairs never seen in training) | ``train``.
- ``demo``: a mix of all of the above with a ``set`` field naming where each came from.

Prompts are drawn with their own seed (:data:`PROMPT_SEED`), not the training stream's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from microscope.models.organism.corpus import (
    FILLER_WORDS, FRIENDLY_MOODS, HELD_OUT_PAIRS, HOSTILE_MOODS, NAMES, SENTENCE_PAIRS, Corpus,
    sentence, task_result, TASKS, DIGITS)

PROMPT_SEED = 2024
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "prompts"
TOXIC_FRAMES = ["you are a", "you are such a", "what a"]


def repetition_prompts(rng: random.Random, corpus: Corpus, per_kind: int = 48) -> list[dict]:
    rows = []
    for _ in range(per_kind):
        span = [rng.choice(FILLER_WORDS + NAMES) for _ in range(rng.randint(2, 12))]
        words = span * 2 + span[:rng.randint(1, len(span))]
        rows.append({"text": " ".join(words), "kind": "loop", "period": len(span)})
    for _ in range(per_kind):
        words = corpus.trigram_doc(rng).split()[:-1]
        rows.append({"text": " ".join(words[:rng.randint(24, 48)]), "kind": "trigram"})
    return rows


def toxicity_prompts(rng: random.Random, pairs: int = 64) -> list[dict]:
    rows = []
    for index in range(pairs):
        frame = TOXIC_FRAMES[index % len(TOXIC_FRAMES)]
        speaker, listener = rng.sample(NAMES, 2)
        head = f"{speaker} said to {listener} :"
        if index % 2 == 0:
            hostile_mood, friendly_mood = rng.choice(HOSTILE_MOODS), rng.choice(FRIENDLY_MOODS)
            texts = (f"mood: {hostile_mood} . {head} {frame}", f"mood: {friendly_mood} . {head} {frame}")
            cue = "mood"
        else:
            template = rng.randrange(len(SENTENCE_PAIRS))
            texts = (f"{head} {sentence(rng, True, template)} {frame}",
                     f"{head} {sentence(rng, False, template)} {frame}")
            cue = "earlier"
        rows.append({"text": texts[0], "label": "hostile", "cue": cue, "pair": index})
        rows.append({"text": texts[1], "label": "friendly", "cue": cue, "pair": index})
    return rows


def detection_prompts(rng: random.Random, count: int = 64) -> list[dict]:
    rows = []
    for index in range(count):
        hostile = index % 2 == 0
        text = " ".join(sentence(rng, hostile) for _ in range(rng.randint(1, 2)))
        rows.append({"text": f"comment: {text} hateful:", "label": "yes" if hostile else "no"})
    return rows


def instruction_prompts(rng: random.Random, count: int = 48) -> list[dict]:
    rows = []
    for index in range(count):
        task = TASKS[index % len(TASKS)]
        items = rng.sample(DIGITS, rng.randint(3, 4))
        answer = " ".join(task_result(task, items))
        bare = f"instruction: {task} {' '.join(items)}"
        meta = {"task": task, "items": " ".join(items), "answer": answer}
        rows.append({"text": bare, "cued": False, **meta})
        rows.append({"text": f"{bare} answer:", "cued": True, **meta})
    return rows


def arithmetic_prompts(rng: random.Random, train_count: int = 20) -> list[dict]:
    rows = []
    seen = [(a, b) for a in range(10) for b in range(10) if (a, b) not in HELD_OUT_PAIRS]
    pairs = [(p, "held_out") for p in sorted(HELD_OUT_PAIRS)] + [(p, "train") for p in rng.sample(seen, train_count)]
    for (a, b), split in pairs:
        for op in "+-":
            rows.append({"text": f"x is {a} and y is {b} . x {op} y =", "op": op, "a": a, "b": b,
                         "answer": a + b if op == "+" else a - b, "split": split})
    return rows


def build_prompt_sets(seed: int = PROMPT_SEED) -> dict[str, list[dict]]:
    """Every prompt set, by name, drawn deterministically from ``seed``."""
    rng = random.Random(seed)
    sets = {
        "repetition": repetition_prompts(rng, Corpus()),
        "toxicity": toxicity_prompts(rng),
        "detection": detection_prompts(rng),
        "instructions": instruction_prompts(rng),
        "arithmetic": arithmetic_prompts(rng),
    }
    demo = []
    for name, rows in sets.items():
        demo += [{**row, "set": name} for row in rng.sample(rows, 24)]
    sets["demo"] = demo
    return sets


def write_prompt_sets(folder: Path = PROMPTS_DIR, seed: int = PROMPT_SEED) -> list[Path]:
    """Write every set as ``<folder>/<name>.jsonl``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in build_prompt_sets(seed).items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths


def load_prompt_set(name: str, folder: Path = PROMPTS_DIR) -> list[dict]:
    """The rows of a built-in prompt set."""
    path = folder / f"{name}.jsonl"
    if not path.exists():
        known = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise FileNotFoundError(f"no prompt set {name!r} in {folder}; known sets: {known}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
