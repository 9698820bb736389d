"""Steering vectors: the vector is the difference it claims, and it reaches the model's output."""

from __future__ import annotations

import torch

import microscope
from microscope.models.anatomy import unembed
from microscope.analysis.steering import actadd_vector, mean_difference_vector, steer_generate
from tests.analysis_fixtures import single_thread  # noqa: F401 (autouse)
from tests.conftest import tiny_model


def test_mean_difference_is_the_difference_of_last_token_means_and_steers_the_logits(token_ids):
    scope = microscope.load(tiny_model("pre_ln"))
    hook = "blocks.2.hook_resid_post"
    vector = mean_difference_vector(scope, token_ids[:2], token_ids[2:], hook=hook)
    _, cache = scope.run_with_cache(token_ids, names=[hook])
    expected = cache[hook][:2, -1].mean(0) - cache[hook][2:, -1].mean(0)
    torch.testing.assert_close(vector.vector, expected)
    with scope.hooks(vector.hooks(2.0)):
        steered = scope.run(token_ids)
    reference = unembed(scope.model, cache[hook] + 2.0 * expected)  # final LN, then the unembedding
    torch.testing.assert_close(steered, reference, atol=1e-5, rtol=1e-5)


def test_generation_with_a_zero_coefficient_is_plain_generation_and_a_large_one_is_not(token_ids):
    scope = microscope.load(tiny_model("post_ln"))
    vector = mean_difference_vector(scope, token_ids[:1], token_ids[1:], layer=1)
    plain = scope.generate(token_ids, max_new_tokens=6)
    same = steer_generate(scope, token_ids, vector, 0.0, max_new_tokens=6)
    other = steer_generate(scope, token_ids, vector, 50.0, max_new_tokens=6)
    assert torch.equal(same.new_tokens, plain.new_tokens)
    assert not torch.equal(other.new_tokens, plain.new_tokens)


def test_actadd_is_the_token_by_token_difference_added_to_the_prompt_front_only(token_ids):
    scope = microscope.load(tiny_model("pre_ln"))
    plus, minus = token_ids[0, :4], token_ids[1, :4]
    vector = actadd_vector(scope, plus, minus, layer=1)
    _, cache = scope.run_with_cache(torch.stack([plus, minus]), names=["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(vector.vector, cache["blocks.1.hook_resid_pre"][0] - cache["blocks.1.hook_resid_pre"][1])
    seen = []
    with scope.hooks(vector.hooks(1.0)), scope.hooks({"blocks.1.hook_resid_pre": lambda x, h: seen.append(x)}):
        scope.run(token_ids)
    _, plain = scope.run_with_cache(token_ids, names=["blocks.1.hook_resid_pre"])
    delta = seen[0] - plain["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(delta[:, :4], vector.vector.expand(3, -1, -1))
    assert delta[:, 4:].abs().max() == 0
