"""Word classes are resolved through the model's own tokenizer: a word of several tokens counts by
its first token as it follows a space, and a class a tokenizer cannot hold is refused by name.
A study takes its words and formats from the caller or from the prompt set's task file."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from microscope.analysis.inputs import distinct_word_classes, task_value, word_class_ids
from microscope.errors import AnalysisInputError, PromptError
from microscope.prompts import PromptSet, load_prompts, load_task
from microscope.models.tokenizer import standin_tokenizer

OPT_BPE = SimpleNamespace(tokenizer=standin_tokenizer())   # OPT's (GPT-2's) byte-level BPE
ORGANISM_V2 = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(
    "microscope/models/organism/weights"))                   # one token per word, an <unk>


def ids_of(text: str) -> list[int]:
    return OPT_BPE.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_word_of_several_tokens_counts_by_its_leading_space_first_token():
    assert len(ids_of(" nincompoop")) == 3 and len(ids_of(" idiot")) == 1
    ids = word_class_ids(OPT_BPE, ["nincompoop", "idiot", "dunce"], parameter="insults")
    assert ids.tolist() == sorted({ids_of(" nincompoop")[0], ids_of(" idiot")[0], ids_of(" dunce")[0]})
    assert OPT_BPE.tokenizer.convert_ids_to_tokens(ids_of(" nincompoop"))[0] == "Ġnin"


def test_words_sharing_a_first_token_are_counted_once():
    assert word_class_ids(OPT_BPE, ["idiot", " idiot"], parameter="insults").tolist() == ids_of(" idiot")


def test_an_unknown_word_is_refused_naming_the_parameter_and_the_prompt_set():
    with pytest.raises(AnalysisInputError, match=r"change insults \(prompt set 'toxicity'\)"):
        word_class_ids(ORGANISM_V2, ["dunce", "zzzz"], parameter="insults", prompts="toxicity")


def test_two_classes_that_share_a_first_token_are_refused():
    # " idiotic" is "Ġid" + "iotic"; " id" is "Ġid"
    with pytest.raises(AnalysisInputError, match=r"insults and praises share first tokens \['Ġid'\]"):
        distinct_word_classes(OPT_BPE, {"insults": ["idiotic"], "praises": ["id", "hero"]})
    classes = distinct_word_classes(OPT_BPE, {"insults": ["idiot"], "praises": ["hero"]})
    assert set(classes) == {"insults", "praises"}


def test_a_set_brings_its_task_beside_it(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"text": "Q: 1 + 1?", "label": "x"}\n')
    (tmp_path / "mine.task.json").write_text('{"cue_token": "A:", "turn_markers": ["Q:", "A:"]}')
    path = tmp_path / "mine.jsonl"
    assert load_task(path) == {"cue_token": "A:", "turn_markers": ["Q:", "A:"]}
    assert load_prompts(path).task == load_task(path)
    assert task_value(path, "cue_token") == "A:" and task_value(path, "cue_token", "Answer:") == "Answer:"
    chosen = PromptSet(load_prompts(path)[:1], load_prompts(path).task)    # a selection keeps the task
    assert task_value(chosen, "turn_markers") == ["Q:", "A:"]


def test_a_missing_task_entry_names_the_parameter_and_the_set(tmp_path):
    (tmp_path / "bare.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(AnalysisInputError, match=r"no insults given and the prompt set .*bare.jsonl' has no "
                                                 r"entry 'insults'.*pass insults="):
        task_value(tmp_path / "bare.jsonl", "insults")
    with pytest.raises(AnalysisInputError, match="these prompts come with no task entry 'insults'"):
        task_value(["hello"], "insults")


def test_a_task_file_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "odd.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "odd.task.json").write_text('["insults"]')
    with pytest.raises(PromptError, match="one JSON object"):
        load_task(tmp_path / "odd.jsonl")
