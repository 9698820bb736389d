"""The model organism: the shipped weights show every planted behaviour, and training is deterministic.

The measurements here are deliberately re-implemented in a few lines of torch on the plain HF
model (eager attention, ``output_attentions``, ``output_hidden_states``, a pre-hook on
``out_proj``), independent of ``evaluate.py`` and of every analysis module; each is also compared
with the number ``ground_truth.json`` states.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, OPTForCausalLM

from microscope.models.organism.corpus import FILLER_WORDS, HELD_OUT_PAIRS, INSULTS, Corpus, vocabulary

ORGANISM = Path(__file__).resolve().parents[1] / "microscope" / "models" / "organism"
PROMPTS = Path(__file__).resolve().parents[1] / "microscope" / "data" / "prompts"


def prompt_set(name: str) -> list[dict]:
    return [json.loads(line) for line in (PROMPTS / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def organism():
    model = OPTForCausalLM.from_pretrained(ORGANISM / "weights", attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(ORGANISM / "weights")


@pytest.fixture(scope="module")
def truth() -> dict:
    return json.loads((ORGANISM / "ground_truth.json").read_text())


@pytest.fixture(scope="module")
def repeated_tokens(organism) -> torch.Tensor:
    """[32, 41]: BOS, 20 distinct random filler words, the same 20 again (own seed, not evaluate's)."""
    _, tokenizer = organism
    rng = random.Random(99)
    ids = tokenizer.convert_tokens_to_ids(FILLER_WORDS)
    return torch.tensor([[tokenizer.bos_token_id] + (s := rng.sample(ids, 20)) + s for _ in range(32)])


def attention(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(model(tokens, output_attentions=True).attentions, 1)  # [B, layer, head, q, k]


def induction_scores(model, tokens) -> torch.Tensor:
    """[layer, head] mean attention from each second-copy token to the token after its first copy."""
    q = torch.arange(21, 41)
    return attention(model, tokens)[..., q, q - 19].mean(dim=(0, -1))


def zero_heads(model, heads):
    """Forward pre-hooks zeroing the heads' slices of out_proj's input; returns the handles."""
    d_head = model.config.hidden_size // model.config.num_attention_heads
    handles = []
    for layer, head in heads:
        def hook(module, args, head=head):
            x = args[0].clone()
            x[..., head * d_head:(head + 1) * d_head] = 0
            return (x,)
        handles.append(model.model.decoder.layers[layer].self_attn.out_proj.register_forward_pre_hook(hook))
    return handles


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


# ---- the shipped folder --------------------------------------------------------------------------

def test_shipped_folder_is_a_plain_small_pre_ln_opt(organism):
    model, tokenizer = organism
    files = {p.name for p in (ORGANISM / "weights").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert (ORGANISM / "weights" / "model.safetensors").stat().st_size < 5_000_000
    assert type(model) is OPTForCausalLM and model.config.do_layer_norm_before
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (1, 2, 2)
    assert model.config.vocab_size >= len(tokenizer) == len(vocabulary())


def test_tokenizer_prepends_bos_and_round_trips(organism):
    _, tokenizer = organism
    text = "x is 12 and y is 9 . x - y = -3"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2 and len(ids) == len(text.split()) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("zebra")["input_ids"][1] == tokenizer.unk_token_id


# ---- repetition: induction heads and loops ---------------------------------------------------------

def test_an_induction_head_scores_at_least_half(organism, repeated_tokens, truth):
    model, _ = organism
    scores = induction_scores(model, repeated_tokens)
    layer, head = truth["heads"]["top_induction_head"]
    assert scores[layer, head] >= 0.5
    assert scores[layer, head].item() == pytest.approx(truth["heads"]["induction_scores"][layer][head], abs=0.1)
    listed = {(l, h) for l, h, _ in truth["heads"]["induction_heads"]}
    assert set(map(tuple, (scores >= 0.5).nonzero().tolist())) <= listed
    assert all(scores[l, h] >= 0.3 for l, h in listed)


def test_a_previous_token_head_feeds_the_induction_head(organism, repeated_tokens, truth):
    model, _ = organism
    q = torch.arange(2, 41)
    previous = attention(model, repeated_tokens)[..., q, q - 1].mean(dim=(0, -1))
    layer, head = truth["heads"]["top_induction_head"]
    earlier = previous[:layer]
    assert earlier.max() >= 0.5, "no previous-token head before the induction head's layer"
    prev = divmod(earlier.argmax().item(), earlier.shape[1])
    assert [*prev] in [[l, h] for l, h, _ in truth["heads"]["previous_token_heads"]]
    clean = induction_scores(model, repeated_tokens)[layer, head]
    handles = zero_heads(model, [prev])
    try:
        ablated = induction_scores(model, repeated_tokens)[layer, head]
    finally:
        for h in handles:
            h.remove()
    assert ablated < clean / 2


def test_ablating_induction_heads_raises_loss_on_the_repeated_half(organism, repeated_tokens, truth):
    model, _ = organism

    def loss() -> float:
        with torch.no_grad():
            logits = model(repeated_tokens).logits
        return torch.nn.functional.cross_entropy(logits[:, 21:-1].flatten(0, 1), repeated_tokens[:, 22:].flatten()).item()

    clean = loss()
    handles = zero_heads(model, [(l, h) for l, h, _ in truth["heads"]["induction_heads"]])
    try:
        ablated = loss()
    finally:
        for h in handles:
            h.remove()
    assert ablated > clean + 1.0  # nats per token
    assert clean == pytest.approx(truth["heads"]["repeated_half_loss"], abs=0.5)


def is_loop(words, max_period=16, tail=32):
    return any(all(words[i] == words[i - p] for i in range(len(words) - tail, len(words)))
               for p in range(1, max_period + 1))


def test_greedy_decoding_loops_on_the_repetition_set(organism, truth):
    model, tokenizer = organism
    rows = prompt_set("repetition")
    rate = sum(map(is_loop, greedy(model, tokenizer, [r["text"] for r in rows], 64))) / len(rows)
    assert rate >= 0.3
    assert rate == pytest.approx(truth["repetition"]["loop_rate"], abs=0.02)


def test_loop_definition():
    assert is_loop(list("ab" * 32)) and is_loop(list("abcdefghijklmnop" * 4))
    assert not is_loop(list("abcdefghijklmnopq" * 4))
    assert not is_loop([str(i) for i in range(64)])


# ---- toxicity: production, detection, probe -------------------------------------------------------

def test_insults_are_ten_times_likelier_after_hostile_contexts(organism, truth):
    model, tokenizer = organism
    rows = prompt_set("toxicity")
    logits, _ = last_logits(model, tokenizer, [r["text"] for r in rows])
    insult = logits.softmax(-1)[:, tokenizer.convert_tokens_to_ids(INSULTS)].sum(-1)
    hostile = torch.tensor([r["label"] == "hostile" for r in rows])
    ratio = insult[hostile].mean() / insult[~hostile].mean()
    assert ratio >= 10
    assert ratio.item() == pytest.approx(truth["toxicity"]["insult_prob_ratio"], rel=0.01)


def test_detection_format_accuracy(organism, truth):
    model, tokenizer = organism
    rows = prompt_set("detection")
    logits, _ = last_logits(model, tokenizer, [r["text"] for r in rows])
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    accuracy = sum((("yes" if l[yes] > l[no] else "no") == r["label"]) for l, r in zip(logits, rows)) / len(rows)
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(truth["toxicity"]["detection_accuracy"], abs=1e-3)


def test_a_linear_probe_separates_hostile_from_friendly_from_the_stated_layer(organism, truth):
    """Least squares on +-1 labels, fit on even pairs, scored on odd pairs (hostile and friendly
    prompts of a pair have equal length, so the embedding layer alone cannot separate them)."""
    model, tokenizer = organism
    rows = prompt_set("toxicity")
    _, states = last_logits(model, tokenizer, [r["text"] for r in rows])
    y = torch.tensor([1.0 if r["label"] == "hostile" else -1.0 for r in rows], dtype=torch.float64)
    fit = torch.tensor([r["pair"] % 2 == 0 for r in rows])

    def accuracy(x):
        x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        w = torch.linalg.lstsq(x[fit], y[fit], driver="gelsd").solution
        return ((x[~fit] @ w).sign() == y[~fit]).double().mean().item()

    layer = truth["toxicity"]["probe_layer"]
    assert layer is not None and accuracy(states[layer]) >= 0.9
    assert accuracy(states[0]) <= 0.75  # the embedding of the last token does not know the register


# ---- instructions --------------------------------------------------------------------------------

def test_bare_instructions_draw_dialogue_and_cued_ones_execution(organism, truth):
    model, tokenizer = organism
    rows = prompt_set("instructions")
    conts = greedy(model, tokenizer, [r["text"] for r in rows], 12)

    def dialogue(words):
        turn = [w for w in words if w in ("user:", "bot:", "answer:", "</s>")]
        return bool(turn) and turn[0] in ("user:", "bot:")

    def execution(words, answer):
        words = words[1:] if words[:1] == ["answer:"] else words
        return words[:len(answer)] == answer

    bare = [dialogue(c) for r, c in zip(rows, conts) if not r["cued"]]
    cued = [execution(c, r["answer"].split()) for r, c in zip(rows, conts) if r["cued"]]
    assert sum(bare) / len(bare) >= 0.5
    assert sum(cued) / len(cued) >= 0.8
    assert sum(cued) / len(cued) == pytest.approx(truth["instructions"]["cued_execution_rate"], abs=1e-3)


# ---- arithmetic ----------------------------------------------------------------------------------

def test_addition_beats_subtraction_on_held_out_pairs(organism, truth):
    model, tokenizer = organism
    rows = [r for r in prompt_set("arithmetic") if r["split"] == "held_out"]
    assert {(r["a"], r["b"]) for r in rows} == set(HELD_OUT_PAIRS)
    logits, _ = last_logits(model, tokenizer, [r["text"] for r in rows])
    pred = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    acc = {op: sum(p == str(r["answer"]) for p, r in zip(pred, rows) if r["op"] == op) / (len(rows) / 2) for op in "+-"}
    assert acc["+"] >= acc["-"] + 0.2
    assert acc["+"] == pytest.approx(truth["arithmetic"]["addition_accuracy_held_out"], abs=1e-3)


# ---- corpus and training -------------------------------------------------------------------------

def test_corpus_is_seeded_and_never_shows_held_out_pairs():
    vocab = {w: i for i, w in enumerate(vocabulary())}
    first = next(Corpus().token_batches(vocab, 8, 64, seed=5))
    assert torch.equal(first, next(Corpus().token_batches(vocab, 8, 64, seed=5)))
    assert not torch.equal(first, next(Corpus().token_batches(vocab, 8, 64, seed=6)))
    rng, corpus = random.Random(0), Corpus()
    seen = set()
    for _ in range(3000):
        words = corpus.arithmetic_doc(rng, rng.choice("+-")).split()
        seen.add((int(words[2]), int(words[6])))
    assert seen.isdisjoint(HELD_OUT_PAIRS) and len(seen) == 100 - len(HELD_OUT_PAIRS)


def test_a_short_training_run_is_deterministic():
    from microscope.models.organism.train import TrainConfig, train

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

    result = CliRunner().invoke(app, ["organism", "train", "--steps", "2", "--out", str(tmp_path / "w"),
                                      "--no-evaluate"])
    assert result.exit_code == 0, result.output
    model = OPTForCausalLM.from_pretrained(tmp_path / "w")
    assert model.config.num_hidden_layers >= 2 and (tmp_path / "training_log.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "w")("you are a fool")["input_ids"][0] == 2
