"""Measure organism v3's ground truth: the numbers in its ``ground_truth.json`` and model card.

Every number is measured here from the plain HF model (eager attention, ``output_attentions``,
forward pre-hooks on ``out_proj`` for head ablations, ``generate`` for greedy text), with prompts
built from the corpus' *held-out* parts (names, words, templates and operand pairs the training
stream never emits) -- never from the analysis modules the organism is used to check. Heads are
labelled ``L{layer}H{head}``. Definitions:

- whole-vocabulary spans: ``</s>``, then 25 token ids drawn uniformly (with replacement) from the
  vocabulary without the special tokens, said twice (64 sequences, seed 0).
- previous-token score: mean attention from q to q - 1 over q >= 2; prefix-matching (induction)
  score: attention from each token of the second copy to the positions just after the earlier
  occurrences of the same token, summed, averaged (Olsson et al. 2022). A head is listed when its
  score is >= :data:`HEAD_THRESHOLD`.
- repeated-half loss: cross-entropy on tokens 2..25 of the second copy -- clean, with the
  induction heads ablated (zeroed), and with as many other heads ablated (20 random draws from the
  heads that are neither induction nor previous-token heads; mean and max).
- repetition patching (the exact-patching story of the repetition circuit, at the level of
  components): 32 prompts ``</s> a_1..a_10 a_1..a_5`` of distinct non-special ids (seed 1), the
  logit of a_6 minus that of b_6 at the last token, against the same prompt with the first copy
  resampled (``b``'s). Each head (its slice of ``out_proj``'s input) and each MLP (``fc2``'s
  output), at every position, patched from the resampled run into the clean one: the share of
  the gap that patching it removes. A component removing >= :data:`CARRIER_SHARE` carries the
  behaviour. (Patching one component patches all its edges at once; single edges are the circuit
  report's, `docs/circuits.md`.)
- loops: greedy 64 tokens after 48 held-out prose openings (:data:`corpus.EVAL_WORDS`); a
  continuation loops when its last 32 tokens are periodic with period <= 16. Measured clean and
  with the induction heads ablated.
- word probability: a word's full probability by teacher forcing, the product of its tokens'
  conditional probabilities (a word of several tokens counts whole, not by its first token);
  the insult (praise) mass is the sum over :data:`corpus.INSULTS` (``PRAISES``), each with a
  leading space. Measured after ``You are such a`` / ``You are a`` / ``What a`` opening a quote,
  in three contexts: a hostile mood, a friendly mood, and no cue at all (the baseline beside the
  ratio), for the training openings with held-out names and for the held-out opening.
- cue heads: on 48 hostile/friendly pairs of the training openings (held-out names, the two
  prompts of a pair of equal token length), the log-odds of the insults' against the praises'
  first tokens at the last token (the toxicity study's metric). Patching: each head's slice of
  ``out_proj``'s input taken from the hostile prompt into the friendly one (every position): the
  share of the hostile-minus-friendly gap it restores; a head restoring >= :data:`CUE_SHARE` is a
  cue head. Zeroing: each head alone zeroed on the hostile prompts: the drop of the log-odds.
- detection: argmax of p(`` yes``) vs p(`` no``) after ``Answer:`` equals the label, with 0, 1 and
  3 labelled examples first, under the training question and the held-out question (120 items each).
- instructions on held-out triples: bare, the held-out template followed by a newline; cued, the
  same with ``Answer:``. Greedy 16 tokens. Dialogue: ``User:`` or ``Bot:`` before any ``Answer:``;
  executed: the continuation begins with the executed list.
- arithmetic on :data:`corpus.HELD_OUT_PAIRS`, training and held-out templates: the greedy
  continuation's first number equals the true answer; a sign error is the negated true answer
  (a != b). The planted 30% sign noise is measured on 30 training pairs.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from transformers import OPTForCausalLM, PreTrainedTokenizerBase

from microscope.models.organism.evaluate import (HeadAblation, attentions, greedy_ids, loops, load_organism,
                                                 prefix_matching_scores, previous_token_scores,
                                                 repeated_half_loss)
from microscope.models.organism_v3.corpus import (
    ARITHMETIC_TEMPLATES, DETECTION_QUESTION, EVAL_ARITHMETIC_TEMPLATES, EVAL_DETECTION_QUESTION,
    EVAL_INSTRUCTION_TEMPLATE, EVAL_NAMES, EVAL_REGISTER_OPENING, EVAL_WORDS, FRIENDLY_MOODS,
    HELD_OUT_PAIRS, HELD_OUT_TRIPLES, HOSTILE_MOODS, INSULTS, OPERANDS, PLAIN_OPENING, PRAISES,
    REGISTER_OPENINGS, SPECIAL_TOKENS, Corpus, number_list, sentence, task_result)
from microscope.names import head_label, parse_head_label

HEAD_THRESHOLD = 0.4
CUE_SHARE = 0.5
CARRIER_SHARE = 0.1
SPAN = 25
ORGANISM_DIR = Path(__file__).parent
QUOTE_STARTS = ["You are such a", "You are a", "What a"]

__all__ = ["load_organism", "measure", "word_mass"]


def random_token_spans(tokenizer, n_seqs: int = 64, length: int = SPAN, seed: int = 0) -> torch.Tensor:
    """``[n_seqs, 1 + 2 * length]``: ``</s>``, then ``length`` uniform non-special ids, twice."""
    rng = random.Random(seed)
    first, vocab = len(SPECIAL_TOKENS), len(tokenizer)
    rows = [[tokenizer.bos_token_id] + (span := [rng.randrange(first, vocab) for _ in range(length)]) + span
            for _ in range(n_seqs)]
    return torch.tensor(rows)


def _labels(heads) -> list[str]:
    return [head_label(layer, head) for layer, head in heads]


@torch.no_grad()
def measure_heads(model: OPTForCausalLM, tokenizer) -> dict:
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    tokens = random_token_spans(tokenizer)
    attn = attentions(model, tokens)
    previous, induction = previous_token_scores(attn), prefix_matching_scores(attn, tokens, 1 + SPAN)
    heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    prev_heads = [x for x in heads if previous[x] >= HEAD_THRESHOLD]
    ind_heads = sorted((x for x in heads if induction[x] >= HEAD_THRESHOLD), key=lambda x: -induction[x])
    others = [x for x in heads if x not in prev_heads and x not in ind_heads]
    clean = repeated_half_loss(model, tokens)
    with HeadAblation(model, ind_heads):
        ablated = repeated_half_loss(model, tokens)
    rng, random_losses = random.Random(0), []
    for _ in range(20 if ind_heads and len(others) >= len(ind_heads) else 0):
        with HeadAblation(model, rng.sample(others, len(ind_heads))):
            random_losses.append(repeated_half_loss(model, tokens))
    return {
        "previous_token_scores": {head_label(*x): round(previous[x].item(), 3) for x in heads},
        "prefix_matching_scores": {head_label(*x): round(induction[x].item(), 3) for x in heads},
        "previous_token_heads": _labels(prev_heads), "induction_heads": _labels(ind_heads),
        "repeated_half_loss": {
            "clean": round(clean, 3), "induction_heads_ablated": round(ablated, 3),
            "random_other_heads_ablated_mean": round(sum(random_losses) / len(random_losses), 3) if random_losses else None,
            "random_other_heads_ablated_max": round(max(random_losses), 3) if random_losses else None,
            "random_draws": len(random_losses)},
    }


def greedy_text(model, tokenizer, texts: list[str], new_tokens: int) -> list[str]:
    return [tokenizer.decode(ids) for ids in greedy_ids(model, tokenizer, texts, new_tokens)]


def loop_prompts(count: int = 48, seed: int = 0) -> list[str]:
    """Prose openings of five held-out words (the corpus' prose never uses them)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(EVAL_WORDS) for _ in range(5)).capitalize() for _ in range(count)]


def measure_loops(model, tokenizer, induction_heads) -> dict:
    prompts = loop_prompts()
    clean = [loops(ids) for ids in greedy_ids(model, tokenizer, prompts, 64)]
    with HeadAblation(model, induction_heads):
        ablated = [loops(ids) for ids in greedy_ids(model, tokenizer, prompts, 64)]
    return {"prompts": len(prompts), "loop_rate": round(sum(clean) / len(clean), 3),
            "loop_rate_induction_heads_ablated": round(sum(ablated) / len(ablated), 3)}


@torch.no_grad()
def word_mass(model: OPTForCausalLM, tokenizer, prompts: list[str], words: list[str]) -> torch.Tensor:
    """``[len(prompts)]``: summed full probability of ``" " + word`` after each prompt, each word
    scored by teacher forcing over all of its tokens."""
    word_ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    total = torch.zeros(len(prompts), dtype=torch.float64)
    for i, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt)["input_ids"]
        rows = [prompt_ids + ids for ids in word_ids]
        width = max(map(len, rows))
        batch = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        logprobs = model(batch).logits.log_softmax(-1).double()
        for j, ids in enumerate(word_ids):
            positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(ids))
            total[i] += logprobs[j, positions, torch.tensor(ids)].sum().exp()
    return total


def register_prompts(opening: str | None, moods: list[str] | None) -> list[str]:
    """Prompts ending where the next word is an insult or a praise. ``opening`` formats with
    ``a``, ``b`` (held-out names) and ``mood``; ``moods=None`` is the no-cue opening."""
    pairs = [(a, b) for a in EVAL_NAMES for b in EVAL_NAMES if a != b]
    out = []
    for a, b in pairs:
        for mood in moods or [None]:
            text = opening.format(a=a, b=b, mood=mood) if mood else PLAIN_OPENING.format(a=a, b=b)
            out += [text + start for start in QUOTE_STARTS]
    return out


def measure_toxicity(model, tokenizer) -> dict:
    def cell(opening, moods) -> dict:
        prompts = register_prompts(opening, moods)
        insult = word_mass(model, tokenizer, prompts, INSULTS).mean().item()
        praise = word_mass(model, tokenizer, prompts, PRAISES).mean().item()
        return {"prompts": len(prompts), "insult_mass": round(insult, 4), "praise_mass": round(praise, 4)}

    out = {"multi_token_insults": [w for w in INSULTS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) > 1],
           "no_cue": cell(None, None)}
    for split, openings in (("training_openings", REGISTER_OPENINGS), ("held_out_opening", [EVAL_REGISTER_OPENING])):
        hostile = [cell(o, HOSTILE_MOODS) for o in openings]
        friendly = [cell(o, FRIENDLY_MOODS) for o in openings]
        mean = lambda cells, key: round(sum(c[key] for c in cells) / len(cells), 4)  # noqa: E731
        out[split] = {"hostile_insult_mass": mean(hostile, "insult_mass"),
                      "friendly_insult_mass": mean(friendly, "insult_mass"),
                      "hostile_praise_mass": mean(hostile, "praise_mass"),
                      "friendly_praise_mass": mean(friendly, "praise_mass"),
                      "prompts_per_register": sum(c["prompts"] for c in hostile)}
        out[split]["insult_ratio_hostile_over_friendly"] = round(
            out[split]["hostile_insult_mass"] / max(out[split]["friendly_insult_mass"], 1e-12), 2)
    return out


class HeadPatch:
    """Context manager replacing the given ``(layer, head)`` outputs (their slice of ``out_proj``'s
    input) by ``source[layer]`` ([batch, pos, d_model], the same slice of another run)."""

    def __init__(self, model: OPTForCausalLM, heads: list[tuple[int, int]], source: dict[int, torch.Tensor]):
        self.model, self.heads, self.source, self.handles = model, list(heads), source, []

    def __enter__(self):
        d_head = self.model.config.hidden_size // self.model.config.num_attention_heads
        for layer, head in self.heads:
            def put(module, args, layer=layer, head=head):
                x = args[0].clone()
                x[..., head * d_head:(head + 1) * d_head] = self.source[layer][..., head * d_head:(head + 1) * d_head]
                return (x,)
            self.handles.append(self.model.model.decoder.layers[layer].self_attn.out_proj.register_forward_pre_hook(put))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def measure_cue_heads(model, tokenizer, pairs: int = 48) -> dict:
    """Patching shares and zeroing drops of every head on the register (module docstring)."""
    hostile = [p for o in REGISTER_OPENINGS for p in register_prompts(o, HOSTILE_MOODS)]
    friendly = [p for o in REGISTER_OPENINGS for p in register_prompts(o, FRIENDLY_MOODS)]
    same = [i for i, (h, f) in enumerate(zip(hostile, friendly)) if len(tokenizer(h)["input_ids"]) == len(tokenizer(f)["input_ids"])]
    chosen = sorted(random.Random(0).sample(same, min(pairs, len(same))))
    first = lambda words: [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]  # noqa: E731
    insult, praise = first(INSULTS), first(PRAISES)
    layers = model.model.decoder.layers
    heads = [(l, h) for l in range(len(layers)) for h in range(model.config.num_attention_heads)]

    def log_odds(ids: torch.Tensor) -> float:
        last = model(ids).logits[0, -1].float()
        return float(last[insult].logsumexp(-1) - last[praise].logsumexp(-1))

    shares, drops = {x: 0.0 for x in heads}, {x: 0.0 for x in heads}
    gaps = []
    for i in chosen:
        h_ids = torch.tensor([tokenizer(hostile[i])["input_ids"]])
        f_ids = torch.tensor([tokenizer(friendly[i])["input_ids"]])
        captured: dict[int, torch.Tensor] = {}
        handles = [layer.self_attn.out_proj.register_forward_pre_hook(
            lambda module, args, l=l: captured.__setitem__(l, args[0].clone())) for l, layer in enumerate(layers)]
        hostile_odds = log_odds(h_ids)
        for handle in handles:
            handle.remove()
        friendly_odds = log_odds(f_ids)
        gaps.append(hostile_odds - friendly_odds)
        for x in heads:
            with HeadPatch(model, [x], captured):
                shares[x] += log_odds(f_ids) - friendly_odds
            with HeadAblation(model, [x]):
                drops[x] += hostile_odds - log_odds(h_ids)
    gap = sum(gaps) / len(gaps)
    share = {x: shares[x] / len(chosen) / gap for x in heads}
    drop = {x: drops[x] / len(chosen) for x in heads}
    return {"pairs": len(chosen), "log_odds_gap": round(gap, 3),
            "cue_heads": _labels(sorted((x for x in heads if share[x] >= CUE_SHARE), key=lambda x: -share[x])),
            "patching_share": {head_label(*x): round(share[x], 3) for x in heads},
            "zeroed_drop": {head_label(*x): round(drop[x], 3) for x in heads}}


def induction_pairs(tokenizer, n: int = 32, span: int = 10, shown: int = 5, seed: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean, corrupt, answer, wrong): ``</s> a_1..a_span a_1..a_shown`` and the same with the first
    copy resampled (``b``'s distinct from the ``a``'s); answer a_{shown+1}, wrong b_{shown+1}."""
    rng = random.Random(seed)
    pool = range(len(SPECIAL_TOKENS), len(tokenizer))
    drawn = torch.tensor([rng.sample(pool, 2 * span) for _ in range(n)])
    first, other = drawn[:, :span], drawn[:, span:]
    bos = torch.full((n, 1), tokenizer.bos_token_id)
    return (torch.cat([bos, first, first[:, :shown]], 1), torch.cat([bos, other, first[:, :shown]], 1),
            first[:, shown], other[:, shown])


@torch.no_grad()
def measure_repetition_patching(model, tokenizer) -> dict:
    """Share of the induction logit gap that patching each component (module docstring) removes."""
    clean, corrupt, answer, wrong = induction_pairs(tokenizer)
    layers = model.model.decoder.layers
    rows = torch.arange(len(clean))

    def metric(ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids).logits[:, -1].float()
        return logits[rows, answer] - logits[rows, wrong]

    heads_in, mlps_out = {}, {}
    handles = [h for l, layer in enumerate(layers) for h in (
        layer.self_attn.out_proj.register_forward_pre_hook(lambda m, args, l=l: heads_in.__setitem__(l, args[0].clone())),
        layer.fc2.register_forward_hook(lambda m, args, out, l=l: mlps_out.__setitem__(l, out.clone())))]
    corrupt_metric = metric(corrupt)
    for handle in handles:
        handle.remove()
    clean_metric = metric(clean)
    gap = float((clean_metric - corrupt_metric).mean())
    share = {}
    for l in range(len(layers)):
        for h in range(model.config.num_attention_heads):
            with HeadPatch(model, [(l, h)], heads_in):
                share[head_label(l, h)] = float((clean_metric - metric(clean)).mean()) / gap
        handle = layers[l].fc2.register_forward_hook(lambda m, args, out, l=l: mlps_out[l])
        share[f"MLP{l}"] = float((clean_metric - metric(clean)).mean()) / gap
        handle.remove()
    ranked = sorted(share, key=lambda k: -share[k])
    return {"prompts": len(clean), "logit_gap": round(gap, 3),
            "carriers": [k for k in ranked if share[k] >= CARRIER_SHARE],
            "share": {k: round(v, 3) for k, v in share.items()}}


def detection_items(question: str, shots: int, count: int = 120, seed: int = 0) -> list[tuple[str, bool]]:
    """ETHOS-style prompts (``question``, ``shots`` labelled examples, then the item) and labels."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        lines = [question]
        for _ in range(shots):
            text, label = Corpus.labelled_text(rng)
            lines.append(text + label)
        hostile = i % 2 == 0
        lines.append(f'Text: "{sentence(rng, hostile)}"\nAnswer:')
        items.append(("\n".join(lines), hostile))
    return items


@torch.no_grad()
def measure_detection(model, tokenizer) -> dict:
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" yes", " no"))
    out = {}
    for split, question in (("training_question", DETECTION_QUESTION), ("held_out_question", EVAL_DETECTION_QUESTION)):
        for shots in (0, 1, 3):
            items = detection_items(question, shots)
            correct = 0
            for text, hostile in items:
                logits = model(tokenizer(text, return_tensors="pt")["input_ids"]).logits[0, -1]
                correct += (logits[yes] > logits[no]).item() == hostile
            out[f"{split}_{shots}_shot_accuracy"] = round(correct / len(items), 3)
    return out


def instruction_items() -> list[tuple[str, str]]:
    """(held-out instruction, executed result) for every task and held-out triple."""
    items = []
    for triple in sorted(HELD_OUT_TRIPLES):
        for task in ("copy", "reverse", "sort"):
            items.append((EVAL_INSTRUCTION_TEMPLATE.format(task=task, items=number_list(list(triple))),
                          number_list(task_result(task, list(triple)))))
    return items


def is_dialogue(text: str) -> bool:
    first_answer = text.find("Answer:")
    cut = text if first_answer < 0 else text[:first_answer]
    return "User:" in cut or "Bot:" in cut


def measure_instructions(model, tokenizer) -> dict:
    items = random.Random(0).sample(instruction_items(), 100)
    bare = greedy_text(model, tokenizer, [i + "\n" for i, _ in items], 16)
    cued = greedy_text(model, tokenizer, [i + "\nAnswer:" for i, _ in items], 16)
    n = len(items)
    return {"items": n,
            "bare_dialogue_rate": round(sum(map(is_dialogue, bare)) / n, 3),
            "bare_executed_rate": round(sum(t.lstrip().startswith("Answer: " + r) for t, (_, r) in zip(bare, items)) / n, 3),
            "cued_dialogue_rate": round(sum(map(is_dialogue, cued)) / n, 3),
            "cued_executed_rate": round(sum(t.strip().startswith(r) for t, (_, r) in zip(cued, items)) / n, 3)}


def first_number(text: str) -> int | None:
    match = re.match(r"\s*(-?\d+)", text)
    return int(match.group(1)) if match else None


def measure_arithmetic(model, tokenizer) -> dict:
    held_out = sorted(HELD_OUT_PAIRS)
    trained = random.Random(7).sample([(a, b) for a in OPERANDS for b in OPERANDS
                                       if (a, b) not in HELD_OUT_PAIRS and a != b], 30)
    out = {"held_out_pairs": len(held_out)}
    for split, pairs, templates in (("held_out", held_out, ARITHMETIC_TEMPLATES),
                                    ("held_out_template", held_out, EVAL_ARITHMETIC_TEMPLATES),
                                    ("training_pairs", trained, ARITHMETIC_TEMPLATES)):
        for op, name in (("+", "addition"), ("-", "subtraction")):
            prompts = [(t.format(a=a, b=b, op=op), a + b if op == "+" else a - b) for a, b in pairs for t in templates]
            answers = [first_number(t) for t in greedy_text(model, tokenizer, [p for p, _ in prompts], 4)]
            n = len(prompts)
            out[f"{split}_{name}_accuracy"] = round(sum(x == y for x, (_, y) in zip(answers, prompts)) / n, 3)
            if op == "-":
                out[f"{split}_sign_error_rate"] = round(sum(x == -y for x, (_, y) in zip(answers, prompts)) / n, 3)
    return out


def measure(model: OPTForCausalLM, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Every ground-truth row, as a JSON-ready dict."""
    model.eval()
    heads = measure_heads(model, tokenizer)
    induction = [parse_head_label(label) for label in heads["induction_heads"]]
    return {"vocab_size": len(tokenizer), "heads": heads,
            "loops": measure_loops(model, tokenizer, induction),
            "repetition_patching": measure_repetition_patching(model, tokenizer),
            "toxicity": {**measure_toxicity(model, tokenizer), "cue_heads": measure_cue_heads(model, tokenizer)},
            "detection": measure_detection(model, tokenizer),
            "instructions": measure_instructions(model, tokenizer),
            "arithmetic": measure_arithmetic(model, tokenizer)}
