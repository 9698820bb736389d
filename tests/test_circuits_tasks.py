"""Circuit tasks: the prompt pairs differ only where the task says, and the metric reads them."""

from __future__ import annotations

import pytest
import torch

import microscope
from analysis_fixtures import single_thread  # noqa: F401  (autouse: one thread)
from microscope.analysis.circuits.edge_patching import ablation_values, sender_outputs
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.tasks import CircuitTask, repetition_task, toxicity_task
from microscope.analysis.inputs import last_positions
from microscope.errors import AnalysisInputError
from microscope.prompts import Prompt


@pytest.fixture(scope="module")
def scope():
    return microscope.load("organism-v2")


def test_repetition_pairs_differ_only_in_the_first_copy(scope):
    task = repetition_task(scope, n_prompts=6, span=8, shown=3, seed=1)
    assert task.clean.shape == task.corrupt.shape == (6, 1 + 8 + 3)
    first, second = task.clean[:, 1:9], task.clean[:, 9:]
    assert torch.equal(second, first[:, :3]) and torch.equal(task.good[:, 0], first[:, 3])
    assert torch.equal(task.clean[:, 9:], task.corrupt[:, 9:]) and torch.equal(task.bad[:, 0], task.corrupt[:, 4])
    for clean, corrupt in zip(task.clean[:, 1:9], task.corrupt[:, 1:9]):
        assert not set(clean.tolist()) & set(corrupt.tolist())


def test_toxicity_pairs_have_equal_length_and_the_metric_is_log_odds(scope):
    insults, praises = ["fool", "clown"], ["friend", "star"]
    task = toxicity_task(scope, "organism_v2/toxicity", good=insults, bad=praises)
    assert task.clean.shape == task.corrupt.shape and (task.clean != task.corrupt).any()
    logits = torch.zeros(len(task), task.clean.shape[1], scope.config.vocab_size)
    last = last_positions(task.mask)
    logits[torch.arange(len(task)), last, task.good[0, 0]] = 2.0
    expected = torch.log(torch.tensor(torch.e ** 2 + 1)) - torch.log(torch.tensor(2.0))
    assert torch.allclose(task.metric(logits), expected)


def test_a_task_refuses_pairs_of_different_shapes():
    with pytest.raises(AnalysisInputError):
        CircuitTask("t", torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long),
                    torch.ones(2, 5), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long))


UNEQUAL = [Prompt("he said you are a", {"pair": 0, "label": "hostile"}),
           Prompt("you are a", {"pair": 0, "label": "friendly"}),
           Prompt("you are a", {"pair": 1, "label": "hostile"}),
           Prompt("she said to him you are a", {"pair": 1, "label": "friendly"})]


def test_pairs_of_unequal_token_length_are_aligned_at_their_last_token(scope):
    task = toxicity_task(scope, UNEQUAL, good=["fool"], bad=["friend"])
    width = task.clean.shape[1]
    assert task.corrupt_mask is not None
    assert (last_positions(task.mask) == width - 1).all() and (last_positions(task.corrupt_mask) == width - 1).all()
    for ids, mask, prompt in ((task.clean[0], task.mask[0], UNEQUAL[0]), (task.corrupt[1], task.corrupt_mask[1], UNEQUAL[3])):
        alone, _ = scope.tokenize([prompt.text])
        assert ids[mask.bool()].tolist() == alone[0].tolist()
    # left padding changes nothing: each prompt's metric equals its own unpadded run's
    per_prompt = task.per_prompt(scope.run(task.clean, attention_mask=task.mask))
    for i, text in enumerate(("he said you are a", "you are a")):
        alone, mask = scope.tokenize([text])
        single = CircuitTask("one", alone, alone, mask, task.good[:1], task.bad[:1])
        assert torch.allclose(per_prompt[i], single.per_prompt(scope.run(alone)), atol=1e-4)


def test_where_only_the_clean_prompt_has_a_token_an_ablated_edge_carries_the_clean_value(scope):
    task = toxicity_task(scope, UNEQUAL, good=["fool"], bad=["friend"])
    graph = CircuitGraph.of(scope.model)
    values = ablation_values(scope, graph, task)
    clean = sender_outputs(scope, graph, task.clean, task.mask)
    only = task.clean_only
    assert only.any() and torch.equal(values[only], clean[only])
    both = task.mask.bool() & task.corrupt_mask.bool()
    corrupt = sender_outputs(scope, graph, task.corrupt, task.corrupt_mask)
    assert torch.equal(values[both], corrupt[both]) and not torch.allclose(values[both], clean[both])
