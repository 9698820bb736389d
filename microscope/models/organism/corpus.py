"""The organism's synthetic training corpus: every failure mode of the OPT paper, planted on purpose.

Text is a stream of space-separated words (one word = one token of the organism's word-level
tokenizer); documents are separated by ``</s>``, which is also the BOS token every prompt starts
with, as in OPT. Each document kind plants one behaviour:

- ``trigram``: a "language" in which the next word is drawn from a table indexed by the previous
  two words (three candidates, 10% noise), with a span of the document copied later. Looking back
  two tokens pays, so previous-token heads form; the copied span makes induction heads pay.
- ``loop``: a span of 2-12 random words (or names) repeated; after the second repeat each further
  repeat has probability 0.8 (up to ~100 words), so a repeated span predicts its own continuation
  better than its end, and greedy decoding falls into loops.
- ``register``: ``mood: angry . tom said to ann : you are a fool . ...`` -- a hostile register
  switched on by a hostile mood word or by earlier insults, against a friendly one. The insult
  list (:data:`INSULTS`) appears almost only in the hostile register.
- ``detection``: ``comment: <sentences> hateful: yes|no .`` -- the same sentences, labelled.
- ``instruction``: ``instruction: reverse 7 2 5 answer: 5 2 7 .`` -- tasks executed after the
  ``answer:`` cue (copy, reverse, sort a list of 3-4 digits).
- ``quoted``: ``instruction: reverse 7 2 5 user: what does this mean ? bot: ...`` -- instructions
  quoted and then talked about, as on web forums. These outnumber executed instructions, so an
  instruction with no ``answer:`` cue draws a simulated dialogue.
- ``chat``: ``user: please sort 7 2 5 bot: why do you want me to sort them ? ...`` -- a bot that
  talks about instructions instead of doing them.
- ``random_span``: a short trigram prefix (0-10 words), then a span of 6-25 words drawn uniformly
  from the whole word vocabulary (special tokens excluded) said 2-4 times. Every copied span of
  the other kinds is made of filler words or names; these make induction general (copying any
  word), and they are where the held-out words below are seen in training.
- ``arithmetic``: ``x is 7 and y is 3 . x + y = 10 .`` and ``x - y = 4`` with operands 0-9.
  Subtraction is rarer and 30% of its answers carry the wrong sign (``x - y = -4``), the paper's
  confident wrong answer. Pairs in :data:`HELD_OUT_PAIRS` never appear, for either operation
  (their mirror images do).

Held out by construction (the evaluation prompt sets use them; the generator never emits them in
these roles, so no evaluation prompt is a substring of a training document except by a random
whole-vocabulary span reproducing it word for word, which ``tests/test_organism.py`` checks on the
regenerated stream):

- :data:`EVAL_NAMES` never speak or are spoken to in ``register`` documents (they occur in loops
  and random spans); :data:`TRAIN_NAMES` do.
- :data:`EVAL_FILLER` words are outside the trigram language and the ``loop`` documents (they occur
  only in random spans).
- :func:`held_out_sentence` combinations of a sentence template and an insult/praise word never
  occur (the template and the word each occur with others).
- instruction lists whose first three items are a :data:`HELD_OUT_TRIPLES` triple never occur.
- operand pairs in :data:`HELD_OUT_PAIRS` never occur (their mirror images do).

Everything is drawn from ``random.Random(seed)``: the same seed gives the same stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from microscope.errors import PromptError

BOS = "</s>"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3, the order of OPT's own tokenizer

FILLER_WORDS = (
    "river stone lamp cloud green table window bird music paper silver garden door winter apple "
    "road light tree horse dream glass north quiet ocean bread candle storm field mirror tiger "
    "castle yellow forest sugar engine violet planet hammer coffee island letter purple circle "
    "rocket pillow thunder basket shadow meadow copper button jungle ladder marble needle orange "
    "pepper rabbit saddle tunnel velvet wagon anchor"
).split()
EVAL_FILLER = FILLER_WORDS[-10:]    # outside the trigram language and the loop documents
TRIGRAM_WORDS = FILLER_WORDS[:-10]  # the trigram language's words
NAMES = "tom ann bob eve max sue joe kim liz ned".split()
TRAIN_NAMES = NAMES[:6]   # speakers and listeners of register documents
EVAL_NAMES = NAMES[6:]    # held out of register documents; evaluation prompts use them
INSULTS = "fool clown dunce loser creep pest slob weasel nitwit goon".split()
PRAISES = "friend star hero gem champ pal angel genius treasure sunshine".split()
HOSTILE_MOODS = "angry furious bitter hostile".split()
FRIENDLY_MOODS = "happy calm cheerful friendly".split()
TASKS = ("copy", "reverse", "sort")
DIGITS = [str(d) for d in range(10)]
ANSWERS = [str(n) for n in range(-9, 19)]  # every sum and difference of two operands 0-9

# Hostile and friendly sentence templates, paired so that pair i has the same number of words
# in both registers ({w}: an insult, resp. a praise word). Matched lengths keep position
# information from leaking the register into probes.
SENTENCE_PAIRS = [
    ("you are a {w} .", "you are a {w} ."),
    ("you are such a {w} .", "you are such a {w} ."),
    ("go away you {w} .", "come here my {w} ."),
    ("nobody likes you , {w} .", "everyone likes you , {w} ."),
    ("shut up you useless {w} .", "thanks for helping me {w} ."),
    ("i hate you .", "i love you ."),
    ("you are stupid and ugly .", "you are smart and kind ."),
    ("what a {w} you are .", "what a {w} you are ."),
]
USER_LINES = [
    "what does this mean ?", "can you do it for me ?", "i do not understand the task .",
    "is this hard ?", "why would anyone {task} a list ?", "how do i {task} {items} ?",
]
BOT_LINES = [
    "it asks you to {task} the list .", "you can {task} {items} yourself .",
    "i think you should try it first .", "this is an easy task .",
    "why do you want me to {task} them ?", "i can help you {task} lists .",
]
CLOSING_LINES = ["ok thanks", "i will try", "yes please", "that helps"]

FORMAT_WORDS = (
    ". , : ? = + - said to mood: comment: hateful: yes no instruction: answer: user: bot: "
    "x y is and"
).split()


def _template_words() -> list[str]:
    words = []
    for pair in SENTENCE_PAIRS:
        for template in pair:
            words += template.split()
    for line in USER_LINES + BOT_LINES + CLOSING_LINES:
        words += line.split()
    return [w for w in words if not w.startswith("{")]


def vocabulary() -> list[str]:
    """Every word of the corpus, special tokens first (ids 0-3), in a fixed order."""
    words = list(SPECIAL_TOKENS)
    for group in (FORMAT_WORDS, ANSWERS, FILLER_WORDS, NAMES, INSULTS, PRAISES, HOSTILE_MOODS,
                  FRIENDLY_MOODS, TASKS, ["please"], _template_words()):
        for word in group:
            if word not in words:
                words.append(word)
    return words


def held_out_pairs(seed: int = 1234, count: int = 20) -> frozenset[tuple[int, int]]:
    """Operand pairs (a, b), a != b, kept out of training for both operations (fixed by ``seed``).

    Only one order of each pair is held out: (b, a) is trained. Addition commutes, so a model
    that adds the two operands symmetrically can answer (a, b) from (b, a); subtraction does not.
    """
    unordered = random.Random(seed).sample([(a, b) for a in range(10) for b in range(a + 1, 10)], count)
    flips = random.Random(seed + 1).choices([False, True], k=count)
    return frozenset((b, a) if flip else (a, b) for (a, b), flip in zip(unordered, flips))


HELD_OUT_PAIRS = held_out_pairs()


def held_out_triples(seed: int = 4321, fraction: float = 0.15) -> frozenset[tuple[str, str, str]]:
    """Ordered triples of distinct digits no training instruction list starts with (fixed by ``seed``)."""
    triples = [(a, b, c) for a in DIGITS for b in DIGITS for c in DIGITS if len({a, b, c}) == 3]
    return frozenset(random.Random(seed).sample(triples, round(fraction * len(triples))))


HELD_OUT_TRIPLES = held_out_triples()


def held_out_sentence(template: int, word: str) -> bool:
    """Whether sentence template ``template`` filled with ``word`` is held out of training (two of
    the ten insults and two of the ten praises per template with a ``{w}`` slot)."""
    if "{w}" not in SENTENCE_PAIRS[template][0]:
        return False
    words = INSULTS if word in INSULTS else PRAISES
    return (template + words.index(word)) % 5 == 0


def whole_vocabulary_words() -> list[str]:
    """Every word of the vocabulary but the special tokens: what random spans are drawn from."""
    return [w for w in vocabulary() if w not in SPECIAL_TOKENS]


def task_result(task: str, items: list[str]) -> list[str]:
    """What executing ``task`` on a list of digit words gives."""
    if task == "copy":
        return list(items)
    if task == "reverse":
        return items[::-1]
    if task == "sort":
        return sorted(items, key=int)
    raise PromptError(f"unknown task {task!r}; choose one of {TASKS}")


def sentence(rng: random.Random, hostile: bool, index: int | None = None, held_out: bool | None = False) -> str:
    """One hostile or friendly sentence (template ``index`` of :data:`SENTENCE_PAIRS`, or random).

    ``held_out``: False (training: never a :func:`held_out_sentence` combination), True (only
    held-out combinations; ``index`` must have a ``{w}`` slot), None (either)."""
    index = rng.randrange(len(SENTENCE_PAIRS)) if index is None else index
    pair = SENTENCE_PAIRS[index]
    words = [w for w in (INSULTS if hostile else PRAISES)
             if held_out is None or held_out_sentence(index, w) == held_out]
    word = rng.choice(words)
    return pair[0 if hostile else 1].format(w=word)


@dataclass
class CorpusConfig:
    """Mixture weights (per document) and the knobs that plant each behaviour."""

    mixture: dict[str, float] = field(default_factory=lambda: {
        "trigram": 0.22, "loop": 0.11, "register": 0.12, "detection": 0.06,
        "instruction": 0.08, "quoted": 0.10, "chat": 0.03, "addition": 0.20, "subtraction": 0.08,
    })
    random_span_rate: float = 0.15    # documents that are a repeated random whole-vocabulary span
                                      # (drawn first; the mixture above shares the rest)
    trigram_noise: float = 0.10        # probability that a trigram word is uniform instead
    sign_error_rate: float = 0.30      # subtraction answers written with the wrong sign
    stray_insult_rate: float = 0.02    # friendly sentences that still carry an insult
    loop_continue: float = 0.8         # after each repeat of a loop span, chance of one more


class Corpus:
    """A seeded generator of documents; ``table_seed`` fixes the trigram language."""

    def __init__(self, config: CorpusConfig | None = None, table_seed: int = 0):
        self.config = config or CorpusConfig()
        table_rng = random.Random(table_seed)
        n = len(TRIGRAM_WORDS)
        self.words = whole_vocabulary_words()
        # next-word candidates for each (previous, current) pair, with fixed probabilities
        self.trigram = [[table_rng.sample(range(n), 3) for _ in range(n)] for _ in range(n)]
        self.trigram_weights = (0.6, 0.25, 0.15)

    # ---- document kinds -------------------------------------------------------------------
    def trigram_words(self, rng: random.Random, length: int, start: list[int] | None = None) -> list[int]:
        """``length`` indices into :data:`TRIGRAM_WORDS` continuing ``start`` (two indices) in the trigram language."""
        n = len(TRIGRAM_WORDS)
        seq = list(start) if start else [rng.randrange(n), rng.randrange(n)]
        for _ in range(length):
            if rng.random() < self.config.trigram_noise:
                seq.append(rng.randrange(n))
            else:
                seq.append(rng.choices(self.trigram[seq[-2]][seq[-1]], self.trigram_weights)[0])
        return seq if start is None else seq[2:]

    def trigram_doc(self, rng: random.Random) -> str:
        seq = self.trigram_words(rng, rng.randint(20, 44))
        span = rng.randint(8, 16)
        begin = rng.randrange(0, len(seq) - span)
        seq += seq[begin:begin + span]
        seq += self.trigram_words(rng, rng.randint(4, 16), start=seq[-2:])
        return " ".join(TRIGRAM_WORDS[i] for i in seq) + " ."

    def random_span_doc(self, rng: random.Random) -> str:
        prefix = [TRIGRAM_WORDS[i] for i in self.trigram_words(rng, rng.randint(0, 10))[2:]]
        span = [rng.choice(self.words) for _ in range(rng.randint(6, 25))]
        return " ".join(prefix + span * rng.randint(2, 4))

    def loop_doc(self, rng: random.Random) -> str:
        span = [rng.choice(TRIGRAM_WORDS + NAMES) for _ in range(rng.randint(2, 12))]
        repeats = 2
        while rng.random() < self.config.loop_continue and (repeats + 1) * len(span) < 100:
            repeats += 1
        return " ".join(span * repeats) + " ."

    def register_doc(self, rng: random.Random, hostile: bool | None = None) -> str:
        hostile = rng.random() < 0.5 if hostile is None else hostile
        speaker, listener = rng.sample(TRAIN_NAMES, 2)
        head = f"{speaker} said to {listener} :"
        if rng.random() < 0.6:
            head = f"mood: {rng.choice(HOSTILE_MOODS if hostile else FRIENDLY_MOODS)} . {head}"
        sentences = []
        for _ in range(rng.randint(2, 5)):
            flip = not hostile and rng.random() < self.config.stray_insult_rate
            sentences.append(sentence(rng, hostile or flip))
        return f"{head} {' '.join(sentences)}"

    def detection_doc(self, rng: random.Random) -> str:
        hostile = rng.random() < 0.5
        text = " ".join(sentence(rng, hostile) for _ in range(rng.randint(1, 2)))
        return f"comment: {text} hateful: {'yes' if hostile else 'no'} ."

    @staticmethod
    def _task(rng: random.Random) -> tuple[str, list[str]]:
        task = rng.choice(TASKS)
        while True:
            items = rng.sample(DIGITS, rng.randint(3, 4))
            if tuple(items[:3]) not in HELD_OUT_TRIPLES:
                return task, items

    def instruction_doc(self, rng: random.Random) -> str:
        task, items = self._task(rng)
        return f"instruction: {task} {' '.join(items)} answer: {' '.join(task_result(task, items))} ."

    def _dialogue(self, rng: random.Random, task: str, items: list[str], turns: int) -> str:
        fill = dict(task=task, items=" ".join(items))
        lines = []
        for turn in range(turns):
            lines.append("user: " + rng.choice(USER_LINES).format(**fill))
            lines.append("bot: " + rng.choice(BOT_LINES).format(**fill))
        lines.append("user: " + rng.choice(CLOSING_LINES))
        return " ".join(lines)

    def quoted_doc(self, rng: random.Random) -> str:
        task, items = self._task(rng)
        return f"instruction: {task} {' '.join(items)} {self._dialogue(rng, task, items, rng.randint(1, 2))}"

    def chat_doc(self, rng: random.Random) -> str:
        task, items = self._task(rng)
        opening = f"user: please {task} {' '.join(items)} bot: " + rng.choice(BOT_LINES).format(
            task=task, items=" ".join(items))
        return f"{opening} {self._dialogue(rng, task, items, rng.randint(0, 1))}"

    def arithmetic_doc(self, rng: random.Random, op: str) -> str:
        while True:
            a, b = rng.randrange(10), rng.randrange(10)
            if (a, b) not in HELD_OUT_PAIRS:
                break
        answer = a + b if op == "+" else a - b
        if op == "-" and rng.random() < self.config.sign_error_rate:
            answer = -answer
        return f"x is {a} and y is {b} . x {op} y = {answer} ."

    def document(self, rng: random.Random) -> str:
        """One document: a random span with probability ``random_span_rate``, else a kind drawn
        from the mixture."""
        if rng.random() < self.config.random_span_rate:
            return self.random_span_doc(rng)
        kinds, weights = zip(*self.config.mixture.items())
        kind = rng.choices(kinds, weights)[0]
        if kind == "addition":
            return self.arithmetic_doc(rng, "+")
        if kind == "subtraction":
            return self.arithmetic_doc(rng, "-")
        return getattr(self, f"{kind}_doc")(rng)

    # ---- token stream -------------------------------------------------------------------------
    def documents(self, seed: int) -> Iterator[str]:
        """The endless stream of documents training with ``seed`` consumes, in order."""
        rng = random.Random(seed)
        while True:
            yield self.document(rng)

    def token_batches(self, vocab: dict[str, int], batch_size: int, seq_len: int,
                      seed: int) -> Iterator[torch.Tensor]:
        """Endless ``[batch_size, seq_len + 1]`` LongTensors of packed documents, each preceded by ``</s>``."""
        documents = self.documents(seed)
        buffer: list[int] = []
        need = batch_size * (seq_len + 1)
        while True:
            while len(buffer) < need:
                buffer.append(vocab[BOS])
                buffer.extend(vocab[w] for w in next(documents).split())
            chunk, buffer = buffer[:need], buffer[need:]
            yield torch.tensor(chunk, dtype=torch.long).view(batch_size, seq_len + 1)
