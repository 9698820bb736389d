"""Circuit tasks: the prompt pairs differ only where the task says, and the metric reads them."""

from __future__ import annotations

import pytest
import torch

import microscope
from analysis_fixtures import single_thread  # noqa: F401  (autouse: one thread)
from microscope.analysis.circuits.tasks import CircuitTask, repetition_task, toxicity_task
from microscope.errors import AnalysisInputError


@pytest.fixture(scope="module")
def scope():
    return microscope.load("organism")


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
    task = toxicity_task(scope, "toxicity", good=insults, bad=praises)
    assert task.clean.shape == task.corrupt.shape and (task.clean != task.corrupt).any()
    logits = torch.zeros(len(task), task.clean.shape[1], scope.config.vocab_size)
    last = task.mask.sum(1) - 1
    logits[torch.arange(len(task)), last, task.good[0, 0]] = 2.0
    expected = torch.log(torch.tensor(torch.e ** 2 + 1)) - torch.log(torch.tensor(2.0))
    assert torch.allclose(task.metric(logits), expected)


def test_a_task_refuses_pairs_of_different_shapes():
    with pytest.raises(AnalysisInputError):
        CircuitTask("t", torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long),
                    torch.ones(2, 5), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long))
