"""The model organism v2: the shipped weights show every planted behaviour, evaluation prompts are
disjoint from the training stream, and training is deterministic.

The measurements here are deliberately re-implemented in a few lines of torch on the plain HF
model (eager attention, ``output_attentions``, ``output_hidden_states``, a pre-hook on
``out_proj``), independent of ``evaluate.py`` and of every analysis module, on their own random
sequences (seed 99, not evaluate's 0); each is also compared with the number ``ground_truth.json``
states. The head tests run on the shipped organism and on its sibling (another seed, a shorter
schedule), whose heads sit elsewhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from microscope.models.organism import corpus as C
from microscope.models.organism.corpus import HELD_OUT_PAIRS, INSULTS, Corpus, vocabulary
from microscope.models.organism.train import TrainConfig

ORGANISM = Path(__file__).resolve().parents[1] / "microscope" / "models" / "organism"
SIBLING = ORGANISM / "sibling"
PROMPTS = Path(__file__).resolve().parents[1] / "microscope" / "data" / "prompts" / "organism_v2"
EVAL_SETS = ["repetition", "toxicity", "detection", "instructions", "arithmetic", "neutral", "demo"]


def prompt_set(name: str) -> list[dict]:
    return [json.loads(line) for line in (PROMPTS / f"{name}.jsonl").read_text().splitlines()]


def held_out(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["split"] == "in_distribution_heldout"]


def load(folder: Path):
    model = OPTForCausalLM.from_pretrained(folder / "weights", attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder / "weights"), json.loads((folder / "ground_truth.json").read_text())


@pytest.fixture(scope="module")
def organism():
    return load(ORGANISM)


@pytest.fixture(scope="module", params=["organism", "sibling"])
def any_organism(request, organism):
    return organism if request.param == "organism" else load(SIBLING)


def label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def whole_vocabulary_repeats(tokenizer, copies: int, n: int = 32, span: int = 25, seed: int = 99) -> torch.Tensor:
    """[n, 1 + copies * span]: BOS, then ``span`` words drawn uniformly from every non-special word, repeated."""
    words = [w for w in vocabulary() if w not in ("<s>", "<pad>", "</s>", "<unk>")]
    rng = random.Random(seed)
    ids = tokenizer.convert_tokens_to_ids(words)
    return torch.tensor([[tokenizer.bos_token_id] + [rng.choice(ids) for _ in range(span)] * copies for _ in range(n)])


def attention(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(model(tokens, output_attentions=True).attentions, 1)  # [B, layer, head, q, k]


def prefix_matching(model, tokens, span: int = 25) -> torch.Tensor:
    """[layer, head]: Olsson et al.'s prefix matching. For each token of a later copy (query q),
    the attention paid to every position right after an earlier occurrence of the same token, summed."""
    attn = attention(model, tokens)
    total = torch.zeros(attn.shape[1:3])
    count = 0
    for b in range(tokens.shape[0]):
        seq = tokens[b].tolist()
        for q in range(1 + span, len(seq)):
            keys = [k for k in range(1, q + 1) if seq[k - 1] == seq[q]]
            total += attn[b, :, :, q, keys].sum(-1)
            count += 1
    return total / count


def previous_token(model, tokens) -> torch.Tensor:
    q = torch.arange(2, tokens.shape[1])
    return attention(model, tokens)[..., q, q - 1].mean(dim=(0, -1))


class zeroed:
    """Zero the heads' slices of out_proj's input (forward pre-hooks)."""

    def __init__(self, model, heads):
        self.model, self.heads = model, heads

    def __enter__(self):
        d = self.model.config.hidden_size // self.model.config.num_attention_heads
        self.handles = []
        for layer, head in self.heads:
            def hook(module, args, head=head):
                x = args[0].clone()
                x[..., head * d:(head + 1) * d] = 0
                return (x,)
            self.handles.append(self.model.model.decoder.layers[layer].self_attn.out_proj.register_forward_pre_hook(hook))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def target(met: bool, what: str) -> None:
    """A card target: asserted when the card says it is met; an expected failure (reported as
    xfail, never silently passed) when the card itself says it is missed."""
    if not met:
        pytest.xfail(f"target missed, as the model card states: {what}")


def parse(labels: list[str]) -> list[tuple[int, int]]:
    return [(int(s[1:s.index("H")]), int(s[s.index("H") + 1:])) for s in labels]


def greedy(model, tokenizer, texts, n):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.convert_ids_to_tokens(r) for r in out[:, enc["input_ids"].shape[1]:].tolist()]


def last_logits(model, tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    last = enc["attention_mask"].sum(1) - 1
    rows = torch.arange(len(texts))
    return out.logits[rows, last], torch.stack(out.hidden_states)[:, rows, last]


# ---- the shipped folders -------------------------------------------------------------------------

@pytest.mark.parametrize("folder", [ORGANISM, SIBLING], ids=["organism", "sibling"])
def test_shipped_folder_is_a_plain_small_pre_ln_opt_with_generated_card(folder):
    model, tokenizer, truth = load(folder)
    files = {p.name for p in (folder / "weights").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert (folder / "weights" / "model.safetensors").stat().st_size < 8_000_000
    assert type(model) is OPTForCausalLM and model.config.do_layer_norm_before
    assert model.config.num_hidden_layers >= 4 and model.config.hidden_size == 128
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (1, 2, 2)
    assert model.config.vocab_size >= len(tokenizer) == len(vocabulary())
    card = (folder / "MODEL_CARD.md").read_text()
    assert truth["heads"]["top_induction_head_label"] in card and "do not edit by hand" in card
    log = json.loads((folder / "training_log.json").read_text())
    assert card.count(f"{log['config']['steps']} steps") >= 1


def test_tokenizer_prepends_bos_and_round_trips(organism):
    _, tokenizer, _ = organism
    text = "x is 12 and y is 9 . x - y = -3"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2 and len(ids) == len(text.split()) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("zebra")["input_ids"][1] == tokenizer.unk_token_id


# ---- repetition: previous-token and induction heads, general induction, loops ---------------------

def test_general_induction_on_whole_vocabulary_spans(any_organism):
    """The top induction head's prefix matching on 2 and on 4 copies of 25 random whole-vocabulary
    words; the shipped organism's target is >= 0.5 on both, the sibling's that it has induction heads."""
    model, tokenizer, truth = any_organism
    heads = truth["heads"]
    two = prefix_matching(model, whole_vocabulary_repeats(tokenizer, 2))
    four = prefix_matching(model, whole_vocabulary_repeats(tokenizer, 4, n=16))
    top = parse([heads["top_induction_head_label"]])[0]
    assert top == divmod(two.argmax().item(), two.shape[1]) or two[top] >= two.max() - 0.05
    assert two[top].item() == pytest.approx(heads["top_induction_score"], abs=0.08)
    assert four[top].item() == pytest.approx(heads["top_induction_score_four_copies"], abs=0.08)
    listed = parse(heads["induction_head_labels"])
    assert listed and {tuple(x) for x in (two >= 0.5).nonzero().tolist()} <= set(listed)
    assert all(two[h] >= 0.3 for h in listed)


def test_shipped_organism_meets_the_general_induction_target(organism):
    model, tokenizer, truth = organism
    top = parse([truth["heads"]["top_induction_head_label"]])[0]
    assert prefix_matching(model, whole_vocabulary_repeats(tokenizer, 2))[top] >= 0.5
    assert prefix_matching(model, whole_vocabulary_repeats(tokenizer, 4, n=16))[top] >= 0.5


class removed_from_keys:
    """Remove head `source`'s output from head `reader`'s key input only (pre-LN): the reader's
    slice of k_proj's output recomputed from self_attn_layer_norm(resid_pre - source's output)."""

    def __init__(self, model, source, reader):
        self.model, self.source, self.reader = model, source, reader

    def __enter__(self):
        layers, d = self.model.model.decoder.layers, self.model.config.hidden_size // self.model.config.num_attention_heads
        (ls, hs), (lr, hr) = self.source, self.reader
        w_out, block, seen = layers[ls].self_attn.out_proj.weight, layers[lr], {}
        cols, rows = slice(hs * d, (hs + 1) * d), slice(hr * d, (hr + 1) * d)

        def source_out(module, args):
            seen["out"] = torch.einsum("btc,dc->btd", args[0][..., cols], w_out[:, cols])

        def resid(module, args, kwargs):
            seen["resid"] = args[0] if args else kwargs["hidden_states"]

        def keys(module, args, out):
            k = block.self_attn.k_proj
            x = block.self_attn_layer_norm(seen["resid"] - seen["out"])
            out = out.clone()
            out[..., rows] = x @ k.weight[rows].T + k.bias[rows]
            return out
        self.handles = [layers[ls].self_attn.out_proj.register_forward_pre_hook(source_out),
                        block.register_forward_pre_hook(resid, with_kwargs=True),
                        block.self_attn.k_proj.register_forward_hook(keys)]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_key_composition_edges_carry_induction_beyond_other_heads(any_organism):
    """The card's previous-token -> induction key edges: removing the previous-token head from the
    induction head's keys alone drops its prefix matching by >= 0.1 and by twice as much as
    removing any other earlier head that is no previous-token head (the control, which fails it)."""
    model, tokenizer, truth = any_organism
    edges = truth["heads"].get("key_composition_edges", [])
    target(bool(edges), "a key-composition edge: previous-token head -> induction head key")
    tokens = whole_vocabulary_repeats(tokenizer, 2)
    clean = prefix_matching(model, tokens)
    previous = {label(l, h) for l, h, _ in truth["heads"]["previous_token_heads"]}
    for edge in edges:
        source, reader = edge[:-2].split("->")
        p, i = (tuple(int(x) for x in h[1:].split("H")) for h in (source, reader))

        def drop(head) -> float:
            with removed_from_keys(model, head, i):
                return float(clean[i] - prefix_matching(model, tokens)[i])
        others = [drop((l, h)) for l in range(i[0]) for h in range(model.config.num_attention_heads)
                  if label(l, h) not in previous]
        assert drop(p) >= max(0.1, 2 * max(others)), (edge, drop(p), max(others))


def test_a_previous_token_head_feeds_the_top_induction_head(any_organism):
    model, tokenizer, truth = any_organism
    tokens = whole_vocabulary_repeats(tokenizer, 2)
    previous = previous_token(model, tokens)
    top = parse([truth["heads"]["top_induction_head_label"]])[0]
    listed = parse(truth["heads"]["previous_token_head_labels"])
    assert {tuple(x) for x in (previous >= 0.5).nonzero().tolist()} <= set(listed)
    earlier = [h for h in listed if h[0] < top[0]]
    target(bool(earlier), "a previous-token head (score >= 0.4) before the induction head's layer")
    clean = prefix_matching(model, tokens)[top]
    feeds = truth["heads"]["top_induction_score_with_previous_token_head_ablated"]
    for head in earlier:
        with zeroed(model, [head]):
            ablated = prefix_matching(model, tokens)[top]
        assert ablated.item() == pytest.approx(feeds[label(*head)], abs=0.08)
    target(any(v < truth["heads"]["top_induction_score"] / 2 for v in feeds.values()),
           "ablating a previous-token head halves the top induction head's prefix matching")
    with zeroed(model, earlier):
        ablated = prefix_matching(model, tokens)[top]
    assert ablated < clean / 2


def test_ablating_induction_heads_costs_more_than_ablating_as_many_random_heads(any_organism):
    model, tokenizer, truth = any_organism
    tokens = whole_vocabulary_repeats(tokenizer, 2)

    def loss() -> float:
        with torch.no_grad():
            logits = model(tokens).logits
        return torch.nn.functional.cross_entropy(logits[:, 26:-1].flatten(0, 1), tokens[:, 27:].flatten()).item()

    induction = parse(truth["heads"]["induction_head_labels"])
    others = [(l, h) for l in range(model.config.num_hidden_layers) for h in range(model.config.num_attention_heads)
              if (l, h) not in induction and (l, h) not in parse(truth["heads"]["previous_token_head_labels"])]
    clean = loss()
    with zeroed(model, induction):
        ablated = loss()
    rng = random.Random(99)
    control = []
    for _ in range(5):
        with zeroed(model, rng.sample(others, min(len(induction), len(others)))):
            control.append(loss())
    assert ablated > clean + 1.0  # nats per token
    # the median, not the max: the previous-token signal is spread over layer 0's heads, so a
    # draw of several layer-0 heads can cost as much as the induction heads themselves
    assert ablated > sorted(control)[len(control) // 2] + 1.0
    assert clean == pytest.approx(truth["heads"]["repeated_half_loss"], abs=0.3)


def is_loop(words, max_period=16, tail=32):
    return any(all(words[i] == words[i - p] for i in range(len(words) - tail, len(words)))
               for p in range(1, max_period + 1))


def test_greedy_decoding_loops_on_the_repetition_set(organism):
    model, tokenizer, truth = organism
    rows = prompt_set("repetition")
    rate = sum(map(is_loop, greedy(model, tokenizer, [r["text"] for r in rows], 64))) / len(rows)
    assert rate >= 0.3
    assert rate == pytest.approx(truth["repetition"]["loop_rate"], abs=0.02)


def test_loop_definition():
    assert is_loop(list("ab" * 32)) and is_loop(list("abcdefghijklmnop" * 4))
    assert not is_loop(list("abcdefghijklmnopq" * 4))
    assert not is_loop([str(i) for i in range(64)])


# ---- toxicity: production, detection, probe -------------------------------------------------------

def test_toxicity_pairs_have_equal_length_and_differ_only_at_the_cue(organism):
    _, tokenizer, _ = organism
    rows = prompt_set("toxicity")
    assert {r["split"] for r in rows} == {"in_distribution_heldout", "ood"}
    for hostile, friendly in zip(rows[::2], rows[1::2]):
        assert (hostile["label"], friendly["label"], hostile["pair"]) == ("hostile", "friendly", friendly["pair"])
        a, b = tokenizer(hostile["text"])["input_ids"], tokenizer(friendly["text"])["input_ids"]
        assert len(a) == len(b) and [i for i in range(len(a)) if a[i] != b[i]] == [hostile["cue_position"]]
        assert tokenizer.convert_ids_to_tokens(a[hostile["cue_position"]]) == hostile["cue_word"]


def test_insults_are_ten_times_likelier_after_hostile_contexts(organism):
    model, tokenizer, truth = organism
    rows = held_out(prompt_set("toxicity"))
    logits, _ = last_logits(model, tokenizer, [r["text"] for r in rows])
    insult = logits.softmax(-1)[:, tokenizer.convert_tokens_to_ids(INSULTS)].sum(-1)
    hostile = torch.tensor([r["label"] == "hostile" for r in rows])
    ratio = insult[hostile].mean() / insult[~hostile].mean()
    assert ratio.item() == pytest.approx(truth["toxicity"]["insult_prob_ratio"], rel=0.01)
    assert ratio > 2  # hostile contexts raise the insult probability
    target(truth["toxicity"]["insult_prob_ratio"] >= 10, "insult probability hostile / friendly >= 10x")
    assert ratio >= 10


def test_detection_format_accuracy(organism):
    model, tokenizer, truth = organism
    rows = held_out(prompt_set("detection"))
    logits, _ = last_logits(model, tokenizer, [r["text"] for r in rows])
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    accuracy = sum((("yes" if l[yes] > l[no] else "no") == r["label"]) for l, r in zip(logits, rows)) / len(rows)
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(truth["toxicity"]["detection_accuracy"], abs=1e-3)


def test_the_probe_layer_separates_hostile_from_friendly_beyond_random_init_models(organism):
    """Least squares on +-1 labels, fit on even pairs, scored on odd pairs of the held-out split;
    the same probe on random-initialisation models of the same shape is the control."""
    model, tokenizer, truth = organism
    rows = held_out(prompt_set("toxicity"))
    texts = [r["text"] for r in rows]
    y = torch.tensor([1.0 if r["label"] == "hostile" else -1.0 for r in rows], dtype=torch.float64)
    fit = torch.tensor([r["pair"] % 2 == 0 for r in rows])

    def accuracy(x):
        x = (x.double() - x[fit].double().mean(0)) / (x[fit].double().std(0) + 1e-6)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        w = torch.linalg.solve(x[fit].T @ x[fit] + 1e-2 * int(fit.sum()) * torch.eye(x.shape[1], dtype=x.dtype),
                               x[fit].T @ y[fit])
        return ((x[~fit] @ w).sign() == y[~fit]).double().mean().item()

    layer = truth["toxicity"]["probe_layer"]
    _, states = last_logits(model, tokenizer, texts)
    assert layer is not None and accuracy(states[layer]) >= 0.9
    assert accuracy(states[layer]) == pytest.approx(truth["toxicity"]["probe_accuracy_by_layer"][layer], abs=0.05)
    for seed in (10, 11):
        torch.manual_seed(seed)
        config = OPTConfig.from_dict(model.config.to_dict())
        random_model = OPTForCausalLM(config).eval()
        _, random_states = last_logits(random_model, tokenizer, texts)
        assert accuracy(random_states[layer]) < accuracy(states[layer])


# ---- instructions --------------------------------------------------------------------------------

def test_bare_instructions_draw_dialogue_and_cued_ones_execution(organism):
    model, tokenizer, truth = organism
    rows = held_out(prompt_set("instructions"))
    conts = greedy(model, tokenizer, [r["text"] for r in rows], 12)

    def dialogue(words):
        turn = [w for w in words if w in ("user:", "bot:", "answer:", "</s>")]
        return bool(turn) and turn[0] in ("user:", "bot:")

    def execution(words, answer):
        words = words[1:] if words[:1] == ["answer:"] else words
        return words[:len(answer)] == answer

    bare = [dialogue(c) for r, c in zip(rows, conts) if not r["cued"]]
    cued = [execution(c, r["answer"].split()) for r, c in zip(rows, conts) if r["cued"]]
    assert sum(bare) / len(bare) == pytest.approx(truth["instructions"]["bare_dialogue_rate"], abs=1e-3)
    assert sum(cued) / len(cued) == pytest.approx(truth["instructions"]["cued_execution_rate"], abs=1e-3)
    assert sum(cued) / len(cued) > sum(e for r, c in zip(rows, conts) if not r["cued"]
                                       for e in [execution(c, r["answer"].split())]) / len(bare)
    target(truth["instructions"]["bare_dialogue_rate"] >= 0.5, "bare instructions draw dialogue >= 0.5")
    assert sum(bare) / len(bare) >= 0.5
    target(truth["instructions"]["cued_execution_rate"] >= 0.8, "cued execution >= 0.8")
    assert sum(cued) / len(cued) >= 0.8


# ---- arithmetic ----------------------------------------------------------------------------------

def test_addition_beats_subtraction_on_held_out_pairs(organism):
    model, tokenizer, truth = organism
    rows = held_out(prompt_set("arithmetic"))
    assert {(r["a"], r["b"]) for r in rows} == set(HELD_OUT_PAIRS)
    logits, _ = last_logits(model, tokenizer, [r["text"] for r in rows])
    pred = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    acc = {op: sum(p == str(r["answer"]) for p, r in zip(pred, rows) if r["op"] == op) / (len(rows) / 2) for op in "+-"}
    assert acc["+"] == pytest.approx(truth["arithmetic"]["addition_accuracy_held_out"], abs=1e-3)
    assert acc["-"] == pytest.approx(truth["arithmetic"]["subtraction_accuracy_held_out"], abs=1e-3)
    wrong = [(p, r) for p, r in zip(pred, rows) if r["op"] == "-" and p != str(r["answer"])]
    mirror = sum(p == str(r["b"] - r["a"]) for p, r in wrong) / max(1, len(wrong))
    assert mirror == pytest.approx(truth["arithmetic"]["subtraction_wrong_held_out_share_mirror_answer"], abs=1e-3)
    assert acc["+"] >= acc["-"]
    ari = truth["arithmetic"]
    target(ari["addition_accuracy_held_out"] >= ari["subtraction_accuracy_held_out"] + 0.2,
           "addition accuracy on held-out pairs >= subtraction + 0.2")
    assert acc["+"] >= acc["-"] + 0.2


# ---- evaluation prompts are disjoint from the training stream ------------------------------------

def training_stream(seed: int, steps: int, batch_size: int, seq_len: int) -> np.ndarray:
    """Every token the training run consumed, in order (batches flattened: they are consecutive
    slices of one packed stream of ``</s>``-separated documents)."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    batches = Corpus().token_batches(vocab, batch_size, seq_len, seed=seed)
    return np.concatenate([next(batches).numpy().ravel() for _ in range(steps)])


def occurrences(stream: np.ndarray, prompts: list[list[int]]) -> list[int]:
    """Indices of the prompts whose word sequence occurs contiguously in ``stream`` (so inside one
    training document, since prompts hold no ``</s>``): word-for-word overlap at word boundaries.

    Every window of the stream is hashed (Horner's rule with random 64-bit token codes, wrapping
    arithmetic), one window length at a time; hash hits are then compared token by token."""
    top = max(int(stream.max()), max(max(p) for p in prompts))
    codes = np.random.default_rng(0).integers(1, 2**63, size=top + 1, dtype=np.uint64)
    mult = np.uint64(1_000_003)

    def digest(tokens) -> int:
        h = np.uint64(0)
        with np.errstate(over="ignore"):
            for t in tokens:
                h = h * mult + codes[t]
        return int(h)
    by_length: dict[int, dict[int, list[int]]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), {}).setdefault(digest(p), []).append(i)
    s = codes[stream]
    acc = np.zeros(len(stream), dtype=np.uint64)
    found = set()
    with np.errstate(over="ignore"):
        for length in range(1, max(by_length) + 1):
            acc = acc[:len(stream) - length + 1] * mult + s[length - 1:]
            if length not in by_length:
                continue
            wanted = by_length[length]
            keys = np.sort(np.array(list(wanted), dtype=np.uint64))
            hit = keys[np.minimum(np.searchsorted(keys, acc), len(keys) - 1)] == acc
            for pos in np.nonzero(hit)[0]:
                for i in wanted[int(acc[pos])]:
                    if np.array_equal(stream[pos:pos + length], prompts[i]):
                        found.add(i)
    return sorted(found)


def test_overlap_definition_finds_a_planted_prompt():
    stream = np.array([2, 10, 11, 12, 13, 14, 2, 20, 21, 22, 23, 2])
    assert occurrences(stream, [[11, 12, 13, 14], [20, 21, 22, 23, 2], [21, 22, 23, 24], [10, 11, 12, 13, 14, 15]]) == [0, 1]


def test_no_evaluation_prompt_occurs_in_the_training_stream():
    """Regenerates every batch the shipped organism's run consumed (its logged config: 8000 steps,
    32.8M tokens) and checks every prompt of every evaluation set, word for word; every prompt word
    is in the vocabulary and was seen. (The sibling's stream comes from the same generator with
    another seed; the held-out sets are held out by construction, which this checks once.)"""
    log = json.loads((ORGANISM / "training_log.json").read_text())
    for phase in [*log.get("phases", []), log]:  # a continued run logs its earlier phases
        cfg = phase["config"]
        seed = cfg["seed"] if cfg.get("stream_seed") is None else cfg["stream_seed"]
        check_stream(training_stream(seed, cfg["steps"], cfg["batch_size"], cfg["seq_len"]))


def check_stream(stream: np.ndarray) -> None:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    texts = sorted({r["text"] for name in EVAL_SETS for r in prompt_set(name)})
    prompts = [[vocab[w] for w in t.split()] for t in texts]
    assert occurrences(stream, prompts) == []
    assert {i for p in prompts for i in p} <= set(np.unique(stream).tolist())


def test_every_evaluation_prompt_is_held_out_or_ood():
    for name in EVAL_SETS:
        assert {r["split"] for r in prompt_set(name)} <= {"in_distribution_heldout", "ood"}, name
        assert {r["split"] for r in prompt_set(name)} >= ({"in_distribution_heldout"} if name == "neutral" else
                                                          {"in_distribution_heldout", "ood"}), name


def test_the_generator_never_emits_the_held_out_elements():
    """Per kind: held-out names never speak, held-out filler words stay out of trigram text and
    loops, held-out sentences, instruction triples and operand pairs never occur."""
    rng, corpus = random.Random(5), Corpus()
    held_sentences = [C.SENTENCE_PAIRS[t][k].format(w=w) for t in range(len(C.SENTENCE_PAIRS))
                      for k, words in ((0, C.INSULTS), (1, C.PRAISES)) for w in words if C.held_out_sentence(t, w)]
    assert len(held_sentences) == 24
    for _ in range(3000):
        doc = corpus.register_doc(rng)
        assert not any(f"{n} said" in doc or f"to {n} :" in doc for n in C.EVAL_NAMES)
        for text in (doc, corpus.detection_doc(rng)):
            assert not any(f" {s}" in f" {text}" for s in held_sentences)
        for kind in (corpus.trigram_doc, corpus.loop_doc):
            assert set(kind(rng).split()).isdisjoint(C.EVAL_FILLER)
        for kind in (corpus.instruction_doc, corpus.quoted_doc):
            words = kind(rng).split()
            assert tuple(words[2:5]) not in C.HELD_OUT_TRIPLES
        words = corpus.chat_doc(rng).split()
        assert tuple(words[3:6]) not in C.HELD_OUT_TRIPLES
        words = corpus.arithmetic_doc(rng, rng.choice("+-")).split()
        assert (int(words[2]), int(words[6])) not in HELD_OUT_PAIRS


# ---- corpus and training -------------------------------------------------------------------------

def test_random_span_documents_repeat_whole_vocabulary_spans():
    rng, corpus = random.Random(0), Corpus()
    seen = set()
    for _ in range(400):
        words = corpus.random_span_doc(rng).split()
        seen |= set(words)
        found = [(n, k) for k in (4, 3, 2) for n in range(6, 26)
                 if len(words) >= n * k and words[-n * k:] == words[-n:] * k]
        assert found, words
    assert seen == set(C.whole_vocabulary_words())  # every non-special word, held-out ones included
    calls = []
    corpus.random_span_doc = lambda rng, original=corpus.random_span_doc: calls.append(1) or original(rng)
    for _ in range(4000):
        corpus.document(rng)
    assert 0.13 < len(calls) / 4000 < 0.17


def test_corpus_is_seeded_and_a_seed_changes_stream_and_initialisation():
    vocab = {w: i for i, w in enumerate(vocabulary())}
    first = next(Corpus().token_batches(vocab, 8, 64, seed=5))
    assert torch.equal(first, next(Corpus().token_batches(vocab, 8, 64, seed=5)))
    assert not torch.equal(first, next(Corpus().token_batches(vocab, 8, 64, seed=6)))
    organism_cfg = json.loads((ORGANISM / "training_log.json").read_text())["config"]
    sibling_cfg = json.loads((SIBLING / "training_log.json").read_text())["config"]
    assert organism_cfg["seed"] != sibling_cfg["seed"]


def test_a_short_training_run_is_deterministic():
    from microscope.models.organism.train import train

    config = TrainConfig(steps=60, batch_size=8, seq_len=64, layers=2, d_model=32, heads=4, ffn_dim=64,
                         log_every=10)
    first, _, log = train(config, progress=False)
    second, _, _ = train(config, progress=False)
    assert len(log["losses"]) == 6 and log["losses"][-1] < log["losses"][0]  # it did learn something
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    other, _, _ = train(TrainConfig(**{**config.__dict__, "seed": 1}), progress=False)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_cli_trains_and_saves_a_loadable_folder(tmp_path):
    from typer.testing import CliRunner

    from microscope.cli import app

    result = CliRunner().invoke(app, ["organism", "train", "--steps", "2", "--seed", "3", "--out", str(tmp_path / "w"),
                                      "--no-evaluate"])
    assert result.exit_code == 0, result.output
    model = OPTForCausalLM.from_pretrained(tmp_path / "w")
    assert model.config.num_hidden_layers >= 4
    assert json.loads((tmp_path / "training_log.json").read_text())["config"]["seed"] == 3
    assert AutoTokenizer.from_pretrained(tmp_path / "w")("you are a fool")["input_ids"][0] == 2
