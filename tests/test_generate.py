"""Generation with the KV cache: hooks act at every step, capture records the generated tokens."""

from __future__ import annotations

import torch
from conftest import tiny_model
from test_hooks_reference import word_tokenizer

from microscope.hooks.interventions import add_vector
from microscope.scope import Scope

PROMPTS = [[2, 5, 6, 7, 8], [2, 9, 10]]


def greedy_without_kv_cache(scope: Scope, prompt: list[int], n: int, hooks=None) -> list[int]:
    """The reference: rerun the whole sequence for every new token, hooks applied each time."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = scope.run(torch.tensor([ids]), hooks=hooks)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_generation_with_a_steering_hook_equals_a_greedy_loop(layout):
    scope = Scope(tiny_model(layout))
    v = 3 * torch.randn(scope.config.hidden_size, generator=torch.Generator().manual_seed(2))
    hooks = add_vector("blocks.1.hook_resid_mid", v)
    result = scope.generate(PROMPTS, max_new_tokens=6, hooks=hooks)
    plain = scope.generate(PROMPTS, max_new_tokens=6)
    for i, prompt in enumerate(PROMPTS):
        assert result.new_tokens[i].tolist() == greedy_without_kv_cache(scope, prompt, 6, hooks)
        assert plain.new_tokens[i].tolist() == greedy_without_kv_cache(scope, prompt, 6)
    assert not torch.equal(result.new_tokens, plain.new_tokens)


def test_capture_records_the_position_that_chose_each_token(layout):
    scope = Scope(tiny_model(layout))
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    result = scope.generate(PROMPTS, max_new_tokens=4, capture=names)
    width = result.prompt_mask.shape[1]
    assert result.activations[names[0]].shape == (2, 4, scope.config.hidden_size)
    assert result.activations[names[1]].shape == (2, scope.config.num_attention_heads, 4, width + 3)
    for i, prompt in enumerate(PROMPTS):
        full = torch.tensor([prompt + result.new_tokens[i, :-1].tolist()])
        _, cache = scope.run_with_cache(full, names=names)
        rows = slice(len(prompt) - 1, None)
        torch.testing.assert_close(result.activations[names[0]][i], cache[names[0]][0, rows], atol=1e-5, rtol=0)
        pad = width - len(prompt)                     # generation left-pads: keys shift by `pad`
        pattern = result.activations[names[1]][i, :, :, pad:]
        torch.testing.assert_close(pattern, cache[names[1]][0, :, rows], atol=1e-5, rtol=0)


def test_texts_are_decoded_new_tokens():
    scope = Scope(tiny_model("pre_ln"), word_tokenizer())
    result = scope.generate(["w5 w6 w7", "w9"], max_new_tokens=3)
    assert result.texts == [" ".join(f"w{t}" for t in row) for row in result.new_tokens.tolist()]
    assert result.sequences.shape == (2, 4 + 3)
    assert result.prompt_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
