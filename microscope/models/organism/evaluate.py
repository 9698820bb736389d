"""Measure the organism's ground truth: the numbers in ``ground_truth.json`` and the model card.

Every number is measured here, from the plain HF model (eager attention, ``output_attentions``,
``output_hidden_states``, forward hooks on ``out_proj`` for ablations) -- nothing is typed by hand
and nothing depends on the analysis modules the organism is used to check. Definitions:

- previous-token score of a head: mean attention from position q to q-1 over q = 2..2L of
  ``[BOS] r r`` where r is L = 20 distinct filler words drawn at random (64 sequences, seed 0).
- prefix-matching (induction) score (Olsson et al. 2022): on the same sequences, mean attention
  from each token of the second copy (position L+i) to the token after its first occurrence (i+1).
- a head is listed as previous-token / induction head when its score >= :data:`HEAD_THRESHOLD`.
- head ablation: the head's slice of the input to ``out_proj`` set to zero.
- "feeds": the induction score of the top induction head with each previous-token head ablated.
- repeated-half loss: mean next-token cross-entropy on positions L+1..2L-1 of the second copy
  (the targets are predictable only by copying), clean and with all induction heads ablated.
- loops: greedy decoding of 64 new tokens (the end-of-text token allowed, never stopping); a
  continuation loops if its last 32 tokens are periodic with some period p <= 16.
- insult probability: next-token probability mass on :data:`corpus.INSULTS`, averaged over the
  hostile and over the friendly prompts of ``toxicity``; the ratio is hostile / friendly.
- probe: for each layer l, the last-token ``hidden_states[l]`` of the toxicity prompts
  (``hidden_states[0]`` is the embedding output; the last entry has the final LayerNorm applied),
  standardised, ridge least-squares on +-1 labels trained on even-numbered pairs, accuracy on
  odd-numbered pairs (a score > 0 predicts hostile). The probe layer is the first layer with accuracy >= 0.9.
- detection accuracy: argmax of p(yes) vs p(no) after ``hateful:`` equals the label.
- instructions: greedy 12 tokens. Dialogue: a ``user:`` or ``bot:`` token appears before any
  ``answer:`` and before the document ends (``</s>``). Execution: the continuation starts with the executed result (for a bare
  instruction, optionally after ``answer:``).
- arithmetic: the greedy next token equals the true answer; sign error: it equals the negated
  answer (answer != 0). Reported on held-out pairs (never in training) and on training pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoTokenizer, OPTForCausalLM, PreTrainedTokenizerBase

from microscope.models.organism.corpus import FILLER_WORDS, INSULTS
from microscope.models.organism.prompt_sets import load_prompt_set

HEAD_THRESHOLD = 0.4
PROBE_THRESHOLD = 0.9
ORGANISM_DIR = Path(__file__).parent


def load_organism(folder: str | Path = ORGANISM_DIR / "weights") -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
    """The organism from an HF folder, eager attention (so attention weights can be returned)."""
    model = OPTForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def repeated_random_tokens(tokenizer, n_seqs: int = 64, length: int = 20, seed: int = 0) -> torch.Tensor:
    """``[n_seqs, 1 + 2 * length]``: BOS, then ``length`` distinct filler words, said twice."""
    rng = random.Random(seed)
    ids = tokenizer.convert_tokens_to_ids(FILLER_WORDS)
    rows = [[tokenizer.bos_token_id] + (span := rng.sample(ids, length)) + span for _ in range(n_seqs)]
    return torch.tensor(rows)


class HeadAblation:
    """Context manager zeroing the given ``(layer, head)`` outputs (their slice of ``out_proj``'s input)."""

    def __init__(self, model: OPTForCausalLM, heads: list[tuple[int, int]]):
        self.model, self.heads, self.handles = model, heads, []

    def __enter__(self):
        d_head = self.model.config.hidden_size // self.model.config.num_attention_heads
        for layer in {layer for layer, _ in self.heads}:
            heads = [h for l, h in self.heads if l == layer]

            def zero(module, args, heads=heads):
                x = args[0].clone()
                for h in heads:
                    x[..., h * d_head:(h + 1) * d_head] = 0
                return (x,)
            out_proj = self.model.model.decoder.layers[layer].self_attn.out_proj
            self.handles.append(out_proj.register_forward_pre_hook(zero))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def head_scores(model: OPTForCausalLM, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(previous-token, prefix-matching) scores, each ``[layers, heads]``, on ``tokens`` from
    :func:`repeated_random_tokens`."""
    length = (tokens.shape[1] - 1) // 2
    attn = torch.stack(model(tokens, output_attentions=True).attentions, 1)  # [B, L, H, q, k]
    q = torch.arange(2, 2 * length + 1)
    previous = attn[..., q, q - 1].mean(dim=(0, -1))
    q = torch.arange(length + 1, 2 * length + 1)
    induction = attn[..., q, q - length + 1].mean(dim=(0, -1))
    return previous, induction


@torch.no_grad()
def repeated_half_loss(model: OPTForCausalLM, tokens: torch.Tensor) -> float:
    """Mean cross-entropy predicting tokens L+2..2L (inside the second copy) from their prefix."""
    length = (tokens.shape[1] - 1) // 2
    logits = model(tokens).logits
    pred, target = logits[:, length + 1:-1], tokens[:, length + 2:]
    return torch.nn.functional.cross_entropy(pred.flatten(0, 1), target.flatten()).item()


@torch.no_grad()
def greedy(model: OPTForCausalLM, tokenizer, texts: list[str], new_tokens: int) -> list[list[str]]:
    """Greedy continuations (as word lists) of ``texts``, batched with left padding; never stops early."""
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    out = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.convert_ids_to_tokens(row) for row in out[:, enc["input_ids"].shape[1]:].tolist()]


def loops(words: list[str], max_period: int = 16, tail: int = 32) -> bool:
    """Whether the last ``tail`` words are periodic with some period <= ``max_period``."""
    start = len(words) - tail
    return any(all(words[start + i] == words[start + i - p] for i in range(tail))
               for p in range(1, max_period + 1))


@torch.no_grad()
def next_token_probs(model: OPTForCausalLM, tokenizer, texts: list[str]) -> torch.Tensor:
    """``[len(texts), vocab]`` next-token probabilities after each text (right padding)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(texts)), last].softmax(-1)


@torch.no_grad()
def last_token_states(model: OPTForCausalLM, tokenizer, texts: list[str]) -> torch.Tensor:
    """``[layers + 1, len(texts), d_model]`` hidden states at each text's last token."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    states = torch.stack(model(**enc, output_hidden_states=True).hidden_states)
    last = enc["attention_mask"].sum(1) - 1
    return states[:, torch.arange(len(texts)), last]


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                   y_test: torch.Tensor, ridge: float = 1e-2) -> float:
    """Test accuracy of a ridge least-squares linear classifier on +-1 labels (features standardised)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a = torch.cat([(x_train - mean) / std, torch.ones(len(x_train), 1)], 1).double()
    b = torch.cat([(x_test - mean) / std, torch.ones(len(x_test), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y_train.double())
    return (((b @ w) > 0) == (y_test > 0)).double().mean().item()


def measure(model: OPTForCausalLM, tokenizer) -> dict:
    """Every ground-truth number of the organism (see the module docstring for definitions)."""
    truth: dict = {}
    tokens = repeated_random_tokens(tokenizer)
    previous, induction = head_scores(model, tokens)
    prev_heads = [[l, h, round(previous[l, h].item(), 3)] for l, h in (previous >= HEAD_THRESHOLD).nonzero().tolist()]
    ind_heads = [[l, h, round(induction[l, h].item(), 3)] for l, h in (induction >= HEAD_THRESHOLD).nonzero().tolist()]
    top = divmod(induction.argmax().item(), induction.shape[1])
    feeds = {}
    for l, h, _ in prev_heads:
        if l < top[0]:
            with HeadAblation(model, [(l, h)]):
                feeds[f"{l}.{h}"] = round(head_scores(model, tokens)[1][top].item(), 3)
    clean_loss = repeated_half_loss(model, tokens)
    with HeadAblation(model, [(l, h) for l, h, _ in ind_heads] or [top]):
        ablated_loss = repeated_half_loss(model, tokens)
    truth["heads"] = {
        "threshold": HEAD_THRESHOLD,
        "previous_token_scores": previous.round(decimals=3).tolist(),
        "induction_scores": induction.round(decimals=3).tolist(),
        "previous_token_heads": prev_heads,
        "induction_heads": ind_heads,
        "top_induction_head": list(top),
        "top_induction_score_with_previous_token_head_ablated": feeds,
        "repeated_half_loss": round(clean_loss, 4),
        "repeated_half_loss_induction_ablated": round(ablated_loss, 4),
    }

    rows = load_prompt_set("repetition")
    conts = greedy(model, tokenizer, [r["text"] for r in rows], 64)
    looped = [loops(c) for c in conts]
    by_kind = {}
    for row, flag in zip(rows, looped):
        by_kind.setdefault(row["kind"], []).append(flag)
    truth["repetition"] = {"loop_rate": round(sum(looped) / len(looped), 3),
                           "loop_rate_by_kind": {k: round(sum(v) / len(v), 3) for k, v in by_kind.items()},
                           "prompts": len(rows)}

    rows = load_prompt_set("toxicity")
    probs = next_token_probs(model, tokenizer, [r["text"] for r in rows])
    insult = probs[:, tokenizer.convert_tokens_to_ids(INSULTS)].sum(-1)
    hostile = torch.tensor([r["label"] == "hostile" for r in rows])
    p_hostile, p_friendly = insult[hostile].mean().item(), insult[~hostile].mean().item()
    states = last_token_states(model, tokenizer, [r["text"] for r in rows])
    labels = hostile.double() * 2 - 1
    train = torch.tensor([r["pair"] % 2 == 0 for r in rows])
    accs = [round(probe_accuracy(s[train], labels[train], s[~train], labels[~train]), 3) for s in states]
    truth["toxicity"] = {
        "insult_prob_hostile": round(p_hostile, 4), "insult_prob_friendly": round(p_friendly, 6),
        "insult_prob_ratio": round(p_hostile / p_friendly, 1),
        "probe_accuracy_by_layer": accs,
        "probe_layer": next((l for l, a in enumerate(accs) if a >= PROBE_THRESHOLD), None),
    }
    rows = load_prompt_set("detection")
    probs = next_token_probs(model, tokenizer, [r["text"] for r in rows])
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    pred = ["yes" if p[yes] > p[no] else "no" for p in probs]
    truth["toxicity"]["detection_accuracy"] = round(sum(p == r["label"] for p, r in zip(pred, rows)) / len(rows), 3)

    rows = load_prompt_set("instructions")
    conts = greedy(model, tokenizer, [r["text"] for r in rows], 12)
    result: dict = {}
    for cued in (False, True):
        sel = [(r, c) for r, c in zip(rows, conts) if r["cued"] == cued]
        dialogue = [is_dialogue(c) for _, c in sel]
        execute = [is_execution(c, r["answer"].split()) for r, c in sel]
        name = "cued" if cued else "bare"
        result[f"{name}_dialogue_rate"] = round(sum(dialogue) / len(sel), 3)
        result[f"{name}_execution_rate"] = round(sum(execute) / len(sel), 3)
        for task in sorted({r["task"] for r, _ in sel}):
            hits = [e for (r, _), e in zip(sel, execute) if r["task"] == task]
            result[f"{name}_execution_rate_{task}"] = round(sum(hits) / len(hits), 3)
    truth["instructions"] = result

    rows = load_prompt_set("arithmetic")
    probs = next_token_probs(model, tokenizer, [r["text"] for r in rows])
    pred = tokenizer.convert_ids_to_tokens(probs.argmax(-1).tolist())
    arith = {}
    for split in ("held_out", "train"):
        for op, name in (("+", "addition"), ("-", "subtraction")):
            sel = [(r, p) for r, p in zip(rows, pred) if r["split"] == split and r["op"] == op]
            arith[f"{name}_accuracy_{split}"] = round(sum(p == str(r["answer"]) for r, p in sel) / len(sel), 3)
            if op == "-":
                signed = [(r, p) for r, p in sel if r["answer"] != 0]
                arith[f"subtraction_sign_error_rate_{split}"] = round(
                    sum(p == str(-r["answer"]) for r, p in signed) / len(signed), 3)
    truth["arithmetic"] = arith
    return truth


def is_dialogue(words: list[str]) -> bool:
    """A ``user:``/``bot:`` turn appears before any ``answer:`` and before the document ends."""
    for word in words:
        if word in ("answer:", "</s>"):
            return False
        if word in ("user:", "bot:"):
            return True
    return False


def is_execution(words: list[str], answer: list[str]) -> bool:
    """The continuation starts with the executed result (optionally after ``answer:``)."""
    if words and words[0] == "answer:":
        words = words[1:]
    return words[:len(answer)] == answer
