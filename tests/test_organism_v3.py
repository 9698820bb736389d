"""Organism v3 speaks OPT's language: byte-level BPE with OPT's conventions, the paper's formats,
held-out templates the corpus never writes, and a training run that resumes where it stopped."""

from itertools import islice

import pytest
import torch

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
