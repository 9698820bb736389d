"""Measure the organism's ground truth: the numbers in ``ground_truth.json`` and the model card.

Every number is measured here, from the plain HF model (eager attention, ``output_attentions``,
``output_hidden_states``, forward pre-hooks on ``out_proj`` for ablations) -- nothing is typed by
hand and nothing depends on the analysis modules the organism is used to check. Heads are
labelled ``L{layer}H{head}``. Definitions:

- random whole-vocabulary spans: BOS, then a span of 25 words drawn uniformly (with replacement)
  from every word of the vocabulary but the special tokens, said ``copies`` times (64 sequences,
  seed 0; 2 and 4 copies).
- previous-token score of a head: mean attention from position q to q-1 over every q >= 2 of the
  2-copy sequences.
- prefix-matching (induction) score (Olsson et al. 2022): for each token of a later copy, the
  attention it pays to every position that directly follows an earlier occurrence of the same
  token, summed; averaged over the tokens of the later copies. Measured on 2 and on 4 copies of
  whole-vocabulary spans, and (as in v1) on 2 copies of 20 distinct filler words.
- a head is listed as previous-token / induction head when its score on 2 copies of
  whole-vocabulary spans is >= :data:`HEAD_THRESHOLD`; the top induction head has the highest
  prefix-matching score there.
- head ablation: the head's slice of the input to ``out_proj`` set to zero.
- previous-token feed: the top induction head's prefix-matching score (2 copies) with each
  head of an earlier layer ablated, one at a time (previous-token heads listed apart).
- key composition: for each previous-token head P and induction head I of a later layer, I's
  prefix-matching score (2 copies) when P's output is removed from I's *key* input only (I's key
  slice of ``k_proj`` recomputed from ``self_attn_layer_norm(resid_pre - out_P)``; every other
  reader of the residual sees P), for every head P of an earlier layer. A key-composition edge
  ``P->I.k`` (P a previous-token head) is one whose removal lowers I's score by at least
  :data:`KEY_EDGE_MIN_DROP` and by at least twice as much as removing any other earlier head that
  is not a previous-token head (the control): the previous-token -> induction key edges a circuit
  must contain.
- repeated-half loss: mean next-token cross-entropy on the second copy of the 2-copy
  whole-vocabulary sequences (targets 2..25 of the second copy: predictable only by copying),
  clean; with the induction heads ablated; with as many other heads ablated, drawn at random from
  the heads that are neither induction nor previous-token heads (20 draws; mean and max); and
  with each layer that holds no induction head ablated whole (all its heads).
- loops: greedy decoding of 64 new tokens (the end-of-text token allowed, never stopping); a
  continuation loops if its last 32 tokens are periodic with some period p <= 16. Loops broken:
  the share of looping in-distribution prompts that no longer loop with the induction heads
  ablated, and with as many random other heads ablated (3 draws: mean and max).
- insult probability: next-token probability mass on :data:`corpus.INSULTS`, averaged over the
  hostile and over the friendly prompts of ``toxicity`` (per split); the ratio is hostile / friendly.
- probe: for each layer l, the last-token ``hidden_states[l]`` of the in-distribution toxicity
  prompts (``hidden_states[0]`` is the embedding output; the last entry has the final LayerNorm
  applied), standardised, ridge least-squares on +-1 labels trained on even-numbered pairs,
  accuracy on odd-numbered pairs and on the ood pairs (a score > 0 predicts hostile). Controls:
  the same probe with shuffled training labels (mean of 5 shuffles; selectivity = accuracy -
  control, Hewitt & Liang 2019) and the same probe on 5 random-initialisation models of the
  organism's shape (seeds 0-4; null max). The probe layer is the first layer whose held-out
  accuracy is >= :data:`PROBE_THRESHOLD` and above the random-init null's maximum at that layer.
- detection accuracy: argmax of p(yes) vs p(no) after ``hateful:`` equals the label (per split).
- instructions: greedy 12 tokens. Dialogue: a ``user:`` or ``bot:`` token appears before any
  ``answer:`` and before the document ends (``</s>``). Execution: the continuation starts with
  the executed result (for a bare instruction, optionally after ``answer:``). Per split.
- arithmetic: the greedy next token equals the true answer; held-out pairs (in-distribution
  phrasing and ood phrasing) and 20 training pairs (seen in training; drawn with seed 7). For
  wrong subtraction answers on held-out pairs (a, b): the share equal to b - a, the answer of the
  mirror pair (b, a) that training holds; the share equal to the model's own answer on the mirror
  prompt; and the share that are a wrong sign not explained by the mirror (= a's negation b - a
  while the model answers the mirror prompt otherwise). The planted 30% wrong-sign noise is
  measured where it was planted: the sign-error rate on training pairs.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedTokenizerBase

from microscope.models.organism.corpus import FILLER_WORDS, HELD_OUT_PAIRS, INSULTS, whole_vocabulary_words
from microscope.models.organism.prompt_sets import arithmetic_text, load_prompt_set
from microscope.names import head_label

HEAD_THRESHOLD = 0.4
KEY_EDGE_MIN_DROP = 0.1
PROBE_THRESHOLD = 0.9
SPAN = 25
ORGANISM_DIR = Path(__file__).parent


def load_organism(folder: str | Path = ORGANISM_DIR / "weights") -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
    """The organism from an HF folder, eager attention (so attention weights can be returned)."""
    model = OPTForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def repeated_random_tokens(tokenizer, n_seqs: int = 64, length: int = 20, seed: int = 0) -> torch.Tensor:
    """``[n_seqs, 1 + 2 * length]``: BOS, then ``length`` distinct filler words, said twice (v1's sequences)."""
    rng = random.Random(seed)
    ids = tokenizer.convert_tokens_to_ids(FILLER_WORDS)
    rows = [[tokenizer.bos_token_id] + (span := rng.sample(ids, length)) + span for _ in range(n_seqs)]
    return torch.tensor(rows)


def whole_vocabulary_spans(tokenizer, copies: int, n_seqs: int = 64, length: int = SPAN, seed: int = 0) -> torch.Tensor:
    """``[n_seqs, 1 + copies * length]``: BOS, then a span of ``length`` words drawn uniformly from
    the whole word vocabulary (with replacement), said ``copies`` times."""
    rng = random.Random(seed)
    ids = tokenizer.convert_tokens_to_ids(whole_vocabulary_words())
    rows = [[tokenizer.bos_token_id] + [rng.choice(ids) for _ in range(length)] * copies for _ in range(n_seqs)]
    return torch.tensor(rows)


class HeadAblation:
    """Context manager zeroing the given ``(layer, head)`` outputs (their slice of ``out_proj``'s input)."""

    def __init__(self, model: OPTForCausalLM, heads: list[tuple[int, int]]):
        self.model, self.heads, self.handles = model, list(heads), []

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


class KeyPathRemoval:
    """Context manager removing head ``source``'s output from head ``reader``'s key input only
    (pre-LN): the reader's slice of ``k_proj``'s output is recomputed from its layer's
    ``self_attn_layer_norm(resid_pre - out_source)``; nothing else changes."""

    def __init__(self, model: OPTForCausalLM, source: tuple[int, int], reader: tuple[int, int]):
        self.model, self.source, self.reader, self.handles, self.seen = model, source, reader, [], {}

    def __enter__(self):
        layers = self.model.model.decoder.layers
        d_head = self.model.config.hidden_size // self.model.config.num_attention_heads
        (ls, hs), (lr, hr) = self.source, self.reader
        out_proj, reader = layers[ls].self_attn.out_proj, layers[lr]
        part = slice(hs * d_head, (hs + 1) * d_head)

        def keep_source(module, args):
            self.seen["out"] = args[0][..., part] @ out_proj.weight[:, part].T        # [b, t, d]

        def keep_resid(module, args, kwargs):
            self.seen["resid"] = args[0] if args else kwargs["hidden_states"]

        def keys(module, args, output):
            x = reader.self_attn_layer_norm(self.seen["resid"] - self.seen["out"])
            output = output.clone()
            output[..., hr * d_head:(hr + 1) * d_head] = torch.nn.functional.linear(x, module.weight, module.bias)[..., hr * d_head:(hr + 1) * d_head]
            return output
        self.handles = [out_proj.register_forward_pre_hook(keep_source),
                        reader.register_forward_pre_hook(keep_resid, with_kwargs=True),
                        reader.self_attn.k_proj.register_forward_hook(keys)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def attentions(model: OPTForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, layer, head, q, k]`` attention weights."""
    return torch.stack(model(tokens, output_attentions=True).attentions, 1)


def previous_token_scores(attn: torch.Tensor) -> torch.Tensor:
    """``[layer, head]`` mean attention from q to q - 1, q >= 2."""
    q = torch.arange(2, attn.shape[-1])
    return attn[..., q, q - 1].mean(dim=(0, -1))


def prefix_matching_scores(attn: torch.Tensor, tokens: torch.Tensor, first_copy_end: int) -> torch.Tensor:
    """``[layer, head]``: for each query q >= ``first_copy_end`` (the later copies), the attention
    summed over keys k <= q whose previous token k - 1 equals token q; averaged over queries and batch."""
    t = tokens.shape[1]
    prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], 1)    # token at k - 1
    match = (prev[:, None, :] == tokens[:, :, None])                               # [B, q, k]
    match &= torch.ones(t, t, dtype=torch.bool).tril()[None]                       # k <= q
    q = torch.arange(first_copy_end, t)
    per_query = (attn[..., q, :] * match[:, None, None, q, :]).sum(-1)            # [B, L, H, q]
    return per_query.mean(dim=(0, -1))


@torch.no_grad()
def repeated_half_loss(model: OPTForCausalLM, tokens: torch.Tensor, length: int = SPAN) -> float:
    """Mean cross-entropy predicting tokens 2..length of the second copy from their prefix."""
    logits = model(tokens[:, :1 + 2 * length]).logits
    pred, target = logits[:, length + 1:2 * length], tokens[:, length + 2:2 * length + 1]
    return torch.nn.functional.cross_entropy(pred.flatten(0, 1), target.flatten()).item()


@torch.no_grad()
def greedy_ids(model: OPTForCausalLM, tokenizer, texts: list[str], new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids) of ``texts``, batched with left padding; never stops early."""
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    out = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def greedy(model: OPTForCausalLM, tokenizer, texts: list[str], new_tokens: int) -> list[list[str]]:
    """Greedy continuations (as word lists: one token per word) of ``texts``."""
    return [tokenizer.convert_ids_to_tokens(row) for row in greedy_ids(model, tokenizer, texts, new_tokens)]


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


def random_init_model(model: OPTForCausalLM, seed: int) -> OPTForCausalLM:
    """A freshly initialised model of the same shape (the null of every probe claim)."""
    torch.manual_seed(seed)
    config = OPTConfig.from_dict(model.config.to_dict())
    config._attn_implementation = "eager"
    return OPTForCausalLM(config).eval()


def _labels(heads: list[tuple[int, int]]) -> list[str]:
    return [head_label(l, h) for l, h in heads]


def measure_heads(model: OPTForCausalLM, tokenizer) -> dict:
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    two, four = whole_vocabulary_spans(tokenizer, 2), whole_vocabulary_spans(tokenizer, 4)
    attn2 = attentions(model, two)
    previous = previous_token_scores(attn2)
    induction2 = prefix_matching_scores(attn2, two, 1 + SPAN)
    del attn2
    induction4 = prefix_matching_scores(attentions(model, four), four, 1 + SPAN)
    filler = repeated_random_tokens(tokenizer)
    attn_f = attentions(model, filler)
    induction_filler = prefix_matching_scores(attn_f, filler, 21)
    previous_filler = previous_token_scores(attn_f)
    del attn_f
    prev_heads = [tuple(x) for x in (previous >= HEAD_THRESHOLD).nonzero().tolist()]
    ind_heads = [tuple(x) for x in (induction2 >= HEAD_THRESHOLD).nonzero().tolist()]
    top = divmod(induction2.argmax().item(), n_heads)
    earlier = {}
    for l in range(top[0]):
        for h in range(n_heads):
            with HeadAblation(model, [(l, h)]):
                earlier[head_label(l, h)] = round(prefix_matching_scores(attentions(model, two), two, 1 + SPAN)[top].item(), 3)
    feeds = {head_label(l, h): earlier[head_label(l, h)] for l, h in prev_heads if l < top[0]}
    composition, key_edges = {}, []
    for i in ind_heads if model.config.do_layer_norm_before else []:
        drops = {}
        for p in [(l, h) for l in range(i[0]) for h in range(n_heads)]:
            with KeyPathRemoval(model, p, i):
                score = prefix_matching_scores(attentions(model, two), two, 1 + SPAN)[i].item()
            composition[f"{head_label(*p)}->{head_label(*i)}.k"] = round(score, 3)
            drops[p] = induction2[i].item() - score
        control = max((d for p, d in drops.items() if p not in prev_heads), default=0.0)
        key_edges += [f"{head_label(*p)}->{head_label(*i)}.k" for p in prev_heads
                      if p in drops and drops[p] >= max(KEY_EDGE_MIN_DROP, 2 * control)]
    clean = repeated_half_loss(model, two)
    claimed = ind_heads or [top]
    with HeadAblation(model, claimed):
        ablated = repeated_half_loss(model, two)
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in ind_heads and (l, h) not in prev_heads]
    rng = random.Random(0)
    control = []
    if len(pool) >= len(claimed):
        for _ in range(20):
            with HeadAblation(model, rng.sample(pool, len(claimed))):
                control.append(repeated_half_loss(model, two))
    layer_control = {}
    for layer in range(n_layers):
        if not any(l == layer for l, _ in claimed):
            with HeadAblation(model, [(layer, h) for h in range(n_heads)]):
                layer_control[f"L{layer}"] = round(repeated_half_loss(model, two), 4)

    def rounded(t: torch.Tensor) -> list:
        return [[round(v, 3) for v in row] for row in t.tolist()]
    return {
        "threshold": HEAD_THRESHOLD,
        "span_words": SPAN,
        "previous_token_scores": rounded(previous),
        "induction_scores": rounded(induction2),
        "induction_scores_four_copies": rounded(induction4),
        "induction_scores_filler": rounded(induction_filler),
        "previous_token_scores_filler": rounded(previous_filler),
        "previous_token_heads": [[l, h, round(previous[l, h].item(), 3)] for l, h in prev_heads],
        "induction_heads": [[l, h, round(induction2[l, h].item(), 3)] for l, h in ind_heads],
        "previous_token_head_labels": _labels(prev_heads),
        "induction_head_labels": _labels(ind_heads),
        "top_induction_head": list(top),
        "top_induction_head_label": head_label(*top),
        "top_induction_score": round(induction2[top].item(), 3),
        "top_induction_score_four_copies": round(induction4[top].item(), 3),
        "top_induction_score_filler": round(induction_filler[top].item(), 3),
        "max_induction_score_four_copies": round(induction4.max().item(), 3),
        "top_induction_score_with_previous_token_head_ablated": feeds,
        "top_induction_score_with_earlier_head_ablated": earlier,
        "induction_score_with_key_path_removed": composition,
        "key_composition_edges": key_edges,
        "repeated_half_loss": round(clean, 4),
        "repeated_half_loss_induction_ablated": round(ablated, 4),
        "repeated_half_loss_random_heads_ablated_mean": round(sum(control) / len(control), 4) if control else None,
        "repeated_half_loss_random_heads_ablated_max": round(max(control), 4) if control else None,
        "random_head_draws": len(control),
        "repeated_half_loss_layer_ablated": layer_control,
    }


def measure_repetition(model, tokenizer, induction_heads: list[tuple[int, int]], prev_heads) -> dict:
    rows = load_prompt_set("repetition")
    texts = [r["text"] for r in rows]
    looped = [loops(c) for c in greedy(model, tokenizer, texts, 64)]
    out: dict = {"loop_rate": round(sum(looped) / len(looped), 3), "prompts": len(rows)}
    groups: dict = {}
    for row, flag in zip(rows, looped):
        groups.setdefault(f"{row['split']}/{row['kind']}", []).append(flag)
    out["loop_rate_by_split_kind"] = {k: round(sum(v) / len(v), 3) for k, v in groups.items()}
    ind_dist = [i for i, r in enumerate(rows) if r["split"] == "in_distribution_heldout" and looped[i]]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    loop_texts = [texts[i] for i in ind_dist]

    def broken(heads) -> float:
        with HeadAblation(model, heads):
            again = [loops(c) for c in greedy(model, tokenizer, loop_texts, 64)]
        return sum(not a for a in again) / max(1, len(again))
    out["looping_prompts_in_distribution"] = len(loop_texts)
    if induction_heads and loop_texts:
        out["loops_broken_induction_ablated"] = round(broken(induction_heads), 3)
        pool = [(l, h) for l in range(n_layers) for h in range(n_heads)
                if (l, h) not in induction_heads and (l, h) not in prev_heads]
        rng = random.Random(0)
        if len(pool) >= len(induction_heads):
            draws = [broken(rng.sample(pool, len(induction_heads))) for _ in range(3)]
            out["loops_broken_random_heads_ablated_mean"] = round(sum(draws) / len(draws), 3)
            out["loops_broken_random_heads_ablated_max"] = round(max(draws), 3)
    return out


def measure_toxicity(model, tokenizer) -> dict:
    rows = load_prompt_set("toxicity")
    texts = [r["text"] for r in rows]
    probs = next_token_probs(model, tokenizer, texts)
    insult = probs[:, tokenizer.convert_tokens_to_ids(INSULTS)].sum(-1)
    hostile = torch.tensor([r["label"] == "hostile" for r in rows])
    out: dict = {}
    for split, name in (("in_distribution_heldout", ""), ("ood", "_ood")):
        sel = torch.tensor([r["split"] == split for r in rows])
        p_h, p_f = insult[hostile & sel].mean().item(), insult[~hostile & sel].mean().item()
        out[f"insult_prob_hostile{name}"] = round(p_h, 4)
        out[f"insult_prob_friendly{name}"] = round(p_f, 6)
        out[f"insult_prob_ratio{name}"] = round(p_h / p_f, 1)
    by_cue = {}
    for cue in sorted({r["cue"] for r in rows}):
        sel = torch.tensor([r["cue"] == cue for r in rows])
        by_cue[cue] = [round(insult[hostile & sel].mean().item(), 4), round(insult[~hostile & sel].mean().item(), 4)]
    out["insult_prob_hostile_friendly_by_cue"] = by_cue

    ind = [i for i, r in enumerate(rows) if r["split"] == "in_distribution_heldout"]
    ood = [i for i, r in enumerate(rows) if r["split"] == "ood"]
    train = [i for i in ind if rows[i]["pair"] % 2 == 0]
    test = [i for i in ind if rows[i]["pair"] % 2 == 1]
    labels = hostile.double() * 2 - 1

    def probe(states) -> tuple[list, list, list]:
        acc, acc_ood, ctrl = [], [], []
        for s in states:
            acc.append(probe_accuracy(s[train], labels[train], s[test], labels[test]))
            acc_ood.append(probe_accuracy(s[train], labels[train], s[ood], labels[ood]))
            shuffles = []
            for seed in range(5):
                g = torch.Generator().manual_seed(seed)
                y_tr = labels[train][torch.randperm(len(train), generator=g)]
                y_te = labels[test][torch.randperm(len(test), generator=g)]
                shuffles.append(probe_accuracy(s[train], y_tr, s[test], y_te))
            ctrl.append(sum(shuffles) / len(shuffles))
        return acc, acc_ood, ctrl
    acc, acc_ood, ctrl = probe(last_token_states(model, tokenizer, texts))
    null = []
    for seed in range(5):
        null.append(probe(last_token_states(random_init_model(model, seed), tokenizer, texts))[0])
    null_max = [max(col) for col in zip(*null)]
    r3 = lambda xs: [round(x, 3) for x in xs]
    out.update({
        "probe_accuracy_by_layer": r3(acc),
        "probe_accuracy_ood_by_layer": r3(acc_ood),
        "probe_shuffled_label_accuracy_by_layer": r3(ctrl),
        "probe_selectivity_by_layer": r3([a - c for a, c in zip(acc, ctrl)]),
        "probe_random_init_max_by_layer": r3(null_max),
        "probe_random_init_mean_by_layer": r3([sum(col) / len(col) for col in zip(*null)]),
        "probe_layer": next((l for l, (a, n) in enumerate(zip(acc, null_max)) if a >= PROBE_THRESHOLD and a > n), None),
        "probe_layer_raw": next((l for l, a in enumerate(acc) if a >= PROBE_THRESHOLD), None),
    })
    out["probe_layer_name"] = None if out["probe_layer"] is None else f"hidden_states[{out['probe_layer']}]"

    rows = load_prompt_set("detection")
    probs = next_token_probs(model, tokenizer, [r["text"] for r in rows])
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    pred = ["yes" if p[yes] > p[no] else "no" for p in probs]
    for split, name in (("in_distribution_heldout", ""), ("ood", "_ood")):
        sel = [(p, r) for p, r in zip(pred, rows) if r["split"] == split]
        out[f"detection_accuracy{name}"] = round(sum(p == r["label"] for p, r in sel) / len(sel), 3)
    return out


def measure_instructions(model, tokenizer) -> dict:
    rows = load_prompt_set("instructions")
    conts = greedy(model, tokenizer, [r["text"] for r in rows], 12)
    result: dict = {}
    for split, suffix in (("in_distribution_heldout", ""), ("ood", "_ood")):
        for cued in (False, True):
            sel = [(r, c) for r, c in zip(rows, conts) if r["cued"] == cued and r["split"] == split]
            dialogue = [is_dialogue(c) for _, c in sel]
            execute = [is_execution(c, r["answer"].split()) for r, c in sel]
            name = "cued" if cued else "bare"
            result[f"{name}_dialogue_rate{suffix}"] = round(sum(dialogue) / len(sel), 3)
            result[f"{name}_execution_rate{suffix}"] = round(sum(execute) / len(sel), 3)
            if not suffix:
                for task in sorted({r["task"] for r, _ in sel}):
                    hits = [e for (r, _), e in zip(sel, execute) if r["task"] == task]
                    result[f"{name}_execution_rate_{task}"] = round(sum(hits) / len(hits), 3)
    return result


def training_pairs(count: int = 20, seed: int = 7) -> list[tuple[int, int]]:
    """Operand pairs seen in training (a control for the held-out pairs)."""
    seen = [(a, b) for a in range(10) for b in range(10) if (a, b) not in HELD_OUT_PAIRS]
    return random.Random(seed).sample(seen, count)


def measure_arithmetic(model, tokenizer) -> dict:
    rows = load_prompt_set("arithmetic")
    for a, b in training_pairs():
        for op in "+-":
            rows.append({"text": arithmetic_text(a, b, op), "op": op, "a": a, "b": b,
                         "answer": a + b if op == "+" else a - b, "split": "train"})
    # the model's answers on the mirror prompts (b, a) of the held-out subtraction pairs (seen in training)
    held = [r for r in rows if r["split"] == "in_distribution_heldout" and r["op"] == "-"]
    mirror_texts = [arithmetic_text(r["b"], r["a"], "-") for r in held]
    probs = next_token_probs(model, tokenizer, [r["text"] for r in rows] + mirror_texts)
    words = tokenizer.convert_ids_to_tokens(probs.argmax(-1).tolist())
    pred, mirror_pred = words[:len(rows)], dict(zip([(r["a"], r["b"]) for r in held], words[len(rows):]))
    out: dict = {}
    for split, suffix in (("in_distribution_heldout", "held_out"), ("ood", "ood"), ("train", "train")):
        for op, name in (("+", "addition"), ("-", "subtraction")):
            sel = [(r, p) for r, p in zip(rows, pred) if r["split"] == split and r["op"] == op]
            out[f"{name}_accuracy_{suffix}"] = round(sum(p == str(r["answer"]) for r, p in sel) / len(sel), 3)
            if op == "-":
                signed = [(r, p) for r, p in sel if r["answer"] != 0]
                out[f"subtraction_sign_error_rate_{suffix}"] = round(
                    sum(p == str(-r["answer"]) for r, p in signed) / len(signed), 3)
    wrong = [(r, p) for r, p in zip(rows, pred)
             if r["split"] == "in_distribution_heldout" and r["op"] == "-" and p != str(r["answer"])]
    n = max(1, len(wrong))
    out["subtraction_wrong_held_out"] = len(wrong)
    out["subtraction_wrong_held_out_share_mirror_answer"] = round(
        sum(p == str(r["b"] - r["a"]) for r, p in wrong) / n, 3)
    out["subtraction_wrong_held_out_share_model_mirror_answer"] = round(
        sum(p == mirror_pred[(r["a"], r["b"])] for r, p in wrong) / n, 3)
    out["subtraction_wrong_held_out_share_wrong_sign_not_mirror"] = round(
        sum(p == str(-r["answer"]) and p != mirror_pred[(r["a"], r["b"])] for r, p in wrong) / n, 3)
    out["training_pairs"] = [list(p) for p in training_pairs()]
    return out


def measure(model: OPTForCausalLM, tokenizer) -> dict:
    """Every ground-truth number of the organism (see the module docstring for definitions)."""
    truth: dict = {"heads": measure_heads(model, tokenizer)}
    ind = [(l, h) for l, h, _ in truth["heads"]["induction_heads"]]
    prev = [(l, h) for l, h, _ in truth["heads"]["previous_token_heads"]]
    truth["repetition"] = measure_repetition(model, tokenizer, ind, prev)
    truth["toxicity"] = measure_toxicity(model, tokenizer)
    truth["instructions"] = measure_instructions(model, tokenizer)
    truth["arithmetic"] = measure_arithmetic(model, tokenizer)
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
