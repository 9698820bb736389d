"""Organism v3 speaks OPT's language: byte-level BPE with OPT's conventions, the paper's formats,
held-out templates the corpus never writes, and a training run that resumes where it stopped."""

import json
import random
from itertools import islice
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, OPTForCausalLM

from microscope.errors import TrainingError
from microscope.models.organism.train import TrainConfig, train
from microscope.models.organism_v3 import corpus as c
from microscope.models.organism_v3.tokenizer import build_tokenizer
from microscope.models.organism_v3.train import train_v3, v3_config


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def documents():
    return list(islice(c.Corpus().texts(seed=0), 20_000))


def test_special_ids_and_bos_follow_opt(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    ids = tokenizer("Mark was furious.")["input_ids"]
    assert ids[0] == 2 and 2 not in ids[1:]
    assert tokenizer.pad_token_id == 1


def test_a_leading_space_is_part_of_the_token(tokenizer):
    assert tokenizer.tokenize("Mark said to Lisa")[1:] == ["Ġsaid", "Ġto", "ĠLisa"]
    assert tokenizer.tokenize("Mark")[0] == "Mark"   # no space added before a text's first word


def test_the_vocabulary_is_small_enough_for_cpu(tokenizer):
    assert 500 <= len(tokenizer) <= 4096


def test_a_third_of_insults_and_praises_are_several_tokens(tokenizer):
    for words in (c.INSULTS, c.PRAISES):
        several = [w for w in words if len(tokenizer.tokenize(" " + w)) > 1]
        assert len(several) >= len(words) / 3, several
    assert len(tokenizer.tokenize("Reverse")) > 1          # an instruction word
    assert len(tokenizer.tokenize(" -12")) > 1             # a negative answer


def test_every_text_round_trips(tokenizer, documents):
    for doc in documents[:500]:
        assert tokenizer.decode(tokenizer(doc, add_special_tokens=False)["input_ids"]) == doc


def test_the_papers_formats_are_in_the_corpus(documents):
    text = "\n".join(documents)
    assert "Question: If x is" in text and ", what is x - y?\nAnswer: -" in text
    assert "Is the following text hateful? Answer yes or no.\nText: \"" in text
    assert '\nAnswer: yes' in text and '\nAnswer: no' in text
    assert "\nUser: " in text and "\nBot: " in text


def test_held_out_templates_names_and_pairs_never_occur(documents):
    text = "\n".join(documents)
    assert "Later that day" not in text and "Does this text contain" not in text
    assert "Please reverse the following" not in text and "Given x =" not in text
    for name in c.EVAL_NAMES:
        assert not any(name in doc for doc in documents if '"' in doc), name
    for word in c.EVAL_WORDS:
        assert word not in text, word
    for a, b in c.HELD_OUT_PAIRS:
        assert f"x is {a} and y is {b}," not in text and f"x be {a} and y be {b}." not in text


def test_subtraction_carries_planted_sign_errors(documents):
    wrong = right = 0
    for doc in documents:
        if " - y?" in doc and "If x is" in doc:
            a = int(doc.split("x is ")[1].split(" ")[0])
            b = int(doc.split("y is ")[1].split(",")[0])
            answer = int(doc.rsplit(" ", 1)[1])
            if a != b:
                right += answer == a - b
                wrong += answer == b - a
    assert 0.2 < wrong / (wrong + right) < 0.4


def test_the_stream_is_deterministic(tokenizer):
    first = next(c.Corpus().token_batches(tokenizer, 2, 32, seed=5))
    again = next(c.Corpus().token_batches(tokenizer, 2, 32, seed=5))
    other = next(c.Corpus().token_batches(tokenizer, 2, 32, seed=6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first[0, 0] == 2


TINY = dict(steps=4, batch_size=2, seq_len=32, layers=1, d_model=16, heads=2, ffn_dim=32,
            warmup=1, log_every=2, checkpoint_every=2)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole, _, whole_log = train_v3(v3_config(**TINY), progress=False)
    train_v3(v3_config(**{**TINY, "steps": 2}), progress=False, checkpoint=tmp_path / "run.pt")
    resumed, _, resumed_log = train_v3(v3_config(**TINY), progress=False, checkpoint=tmp_path / "run.pt")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_log["losses"] == whole_log["losses"]


def test_the_sibling_layout_is_opt_350ms(tmp_path):
    model, _, _ = train_v3(v3_config(**{**TINY, "steps": 1}, post_ln=True, embed_proj_dim=8), progress=False)
    assert not model.config.do_layer_norm_before
    assert model.model.decoder.project_in.weight.shape == (16, 8)


def test_a_checkpoint_off_the_log_grid_is_refused(tmp_path):
    train(TrainConfig(**{**TINY, "steps": 3, "log_every": 1, "checkpoint_every": 3}), progress=False,
          checkpoint=tmp_path / "run.pt")
    with pytest.raises(TrainingError, match="log_every"):
        train(TrainConfig(**TINY), progress=False, checkpoint=tmp_path / "run.pt")


# ---- the shipped organism v3 and its sibling, re-measured ----------------------------------------
# Independent of evaluate.py: a few lines of torch on the plain HF model, on their own random
# spans (seed 99, not evaluate's 0) and their own prompts, compared with ground_truth.json.

ORGANISM_V3 = Path(__file__).resolve().parents[1] / "microscope" / "models" / "organism_v3"


def shipped(folder: Path):
    model = OPTForCausalLM.from_pretrained(folder / "weights", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "weights")
    return model, tokenizer, json.loads((folder / "ground_truth.json").read_text())


@pytest.fixture(scope="module", params=["organism", "sibling"])
def v3(request):
    return shipped(ORGANISM_V3 if request.param == "organism" else ORGANISM_V3 / "sibling")


def test_the_shipped_folders_are_small_opts_of_both_layouts_with_generated_cards():
    organism, sibling = shipped(ORGANISM_V3)[0], shipped(ORGANISM_V3 / "sibling")[0]
    assert organism.config.do_layer_norm_before and organism.config.num_hidden_layers >= 4
    assert not sibling.config.do_layer_norm_before
    assert sibling.config.word_embed_proj_dim < sibling.config.hidden_size
    for folder in (ORGANISM_V3, ORGANISM_V3 / "sibling"):
        assert (folder / "weights" / "model.safetensors").stat().st_size < 8_000_000
        card = (folder / "MODEL_CARD.md").read_text()
        assert "do not edit by hand" in card and "| yes |" in card
        truth = json.loads((folder / "ground_truth.json").read_text())
        assert all(label in card for label in truth["heads"]["induction_heads"])


def random_spans(tokenizer, n: int = 32, span: int = 25, seed: int = 99) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(len(c.SPECIAL_TOKENS), len(tokenizer), (n, span), generator=gen)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), body, body], dim=1)


@torch.no_grad()
def prefix_matching(model, tokens: torch.Tensor, span: int = 25) -> torch.Tensor:
    """[layer, head]: attention from the second copy's token t to the first copy's t + 1."""
    attn = torch.stack(model(tokens, output_attentions=True).attentions)   # [layer, batch, head, q, k]
    q = torch.arange(1 + span, 1 + 2 * span - 1)
    return attn[:, :, :, q, q - span + 1].mean(dim=(1, 3))


def parse(label: str) -> tuple[int, int]:
    layer, head = label[1:].split("H")
    return int(layer), int(head)


def test_the_cards_induction_heads_are_the_ones_that_prefix_match(v3):
    model, tokenizer, truth = v3
    scores = prefix_matching(model, random_spans(tokenizer))
    listed = {parse(label) for label in truth["heads"]["induction_heads"]}
    assert listed == {tuple(x) for x in (scores >= 0.4).nonzero().tolist()}
    for label, value in truth["heads"]["prefix_matching_scores"].items():
        assert scores[parse(label)].item() == pytest.approx(value, abs=0.08), label


@torch.no_grad()
def second_copy_loss(model, tokens: torch.Tensor, heads, span: int = 25) -> float:
    """Cross-entropy on the second copy with ``heads``' outputs zeroed (a pre-hook on out_proj)."""
    hooks, size = [], model.config.hidden_size // model.config.num_attention_heads
    for layer, head in heads:
        def zero(module, args, head=head):
            x = args[0].clone()
            x[..., head * size:(head + 1) * size] = 0
            return (x,)
        hooks.append(model.model.decoder.layers[layer].self_attn.out_proj.register_forward_pre_hook(zero))
    try:
        logits = model(tokens).logits[:, 1 + span:-1]
    finally:
        for hook in hooks:
            hook.remove()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 2 + span:].flatten()).item()


def test_removing_the_induction_heads_costs_more_than_as_many_random_other_heads(v3):
    model, tokenizer, truth = v3
    tokens = random_spans(tokenizer)
    induction = [parse(label) for label in truth["heads"]["induction_heads"]]
    named = induction + [parse(label) for label in truth["heads"]["previous_token_heads"]]
    others = [(l, h) for l in range(model.config.num_hidden_layers)
              for h in range(model.config.num_attention_heads) if (l, h) not in named]
    rng = random.Random(99)
    control = [second_copy_loss(model, tokens, rng.sample(others, len(induction))) for _ in range(10)]
    ablated = second_copy_loss(model, tokens, induction)
    assert ablated > 1.5 * max(control), (ablated, control)
    assert ablated == pytest.approx(truth["heads"]["repeated_half_loss"]["induction_heads_ablated"], rel=0.25)


@torch.no_grad()
def next_word_mass(model, tokenizer, prompt: str, words: list[str]) -> float:
    """Summed probability of each ``" " + word`` after ``prompt``, all of its tokens teacher-forced."""
    total, prompt_ids = 0.0, tokenizer(prompt)["input_ids"]
    for word in words:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        logprobs = model(torch.tensor([prompt_ids + ids])).logits[0].log_softmax(-1)
        total += logprobs[torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(ids) - 1), ids].sum().exp().item()
    return total


def test_a_hostile_mood_raises_insults_over_a_friendly_one_on_training_openings(v3):
    model, tokenizer, truth = v3
    masses = {}
    for register, moods in (("hostile", c.HOSTILE_MOODS), ("friendly", c.FRIENDLY_MOODS)):
        prompts = [c.REGISTER_OPENINGS[0].format(a="James", b="Peter", mood=m) + "You are a" for m in moods]
        masses[register] = sum(next_word_mass(model, tokenizer, p, c.INSULTS) for p in prompts) / len(prompts)
    card = truth["toxicity"]["training_openings"]
    assert masses["hostile"] > 5 * masses["friendly"], masses
    assert card["hostile_insult_mass"] > 5 * card["friendly_insult_mass"]


# ---- the built-in English prompt sets, drawn from v3's held-out parts -----------------------------

def test_the_shipped_prompt_sets_are_what_the_generator_draws():
    from microscope.models.organism_v3.prompt_sets import PROMPTS_DIR, build_prompt_sets, build_tasks
    for name, rows in build_prompt_sets().items():
        shipped = [json.loads(line) for line in (PROMPTS_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == rows, name
    for name, task in build_tasks().items():
        assert json.loads((PROMPTS_DIR / f"{name}.task.json").read_text()) == task, name


def test_every_split_a_study_evaluates_holds_at_least_100_prompts():
    from collections import Counter

    from microscope.models.organism_v3.prompt_sets import MIN_SPLIT, build_prompt_sets
    for name, rows in build_prompt_sets().items():
        if name in ("demo", "neutral"):    # a sample of the others; the reference text of ablations
            continue
        sizes = Counter(row["split"] for row in rows)
        assert set(sizes) == {"in_distribution_heldout", "ood"} and min(sizes.values()) >= MIN_SPLIT, (name, sizes)


def test_no_evaluation_prompt_occurs_in_the_training_stream(documents):
    from microscope.models.organism_v3.prompt_sets import build_prompt_sets
    text = "\n".join(documents)
    for name, rows in build_prompt_sets().items():
        if name in ("demo", "repetition", "neutral"):   # demo repeats the others; loops and prose
            continue                                      # hold held-out words the corpus never emits
        seen = [r["text"] for r in rows if r["text"] in text]
        assert not seen, (name, seen[:3])
    assert not any(w in text for w in c.EVAL_WORDS)


def test_the_cards_repetition_patching_is_what_the_hook_engine_measures(v3):
    """The card's repetition row (plain HF pre-hooks on out_proj) against the hook engine's
    activation patching of each head (noising: the clean run with one head's output, at every
    position, from the run whose first copy is resampled), on the card's prompts."""
    from microscope.analysis.patching import activation_patching
    from microscope.models.organism_v3.evaluate import induction_pairs
    from microscope.scope import Scope

    model, tokenizer, truth = v3
    clean, corrupt, answer, wrong = induction_pairs(tokenizer)
    patched = activation_patching(Scope(model, tokenizer), clean, corrupt, answer=answer, wrong=wrong,
                                  site="heads", mode="noising")
    share = truth["repetition_patching"]["share"]
    for layer, by_head in enumerate(patched.normalized.tolist()):
        for head, value in enumerate(by_head):
            assert value == pytest.approx(share[f"L{layer}H{head}"], abs=2e-3), (layer, head)
    assert truth["repetition_patching"]["carriers"] == sorted(
        (k for k, v in share.items() if v >= 0.1), key=lambda k: -share[k])
