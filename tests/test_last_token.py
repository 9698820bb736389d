"""A last-token intervention on the cached prefix (`analysis.last_token.LastToken`) gives the
logits of the full forward with the same intervention, in every OPT layout, with right padding and
prompts of unequal length; and the cache is left as it was, so runs can follow one another."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from microscope.analysis.inputs import last_positions, last_token_logits
from microscope.analysis.last_token import LastToken
from microscope.names import act_name
from microscope.scope import Scope


@pytest.fixture
def scope(layout) -> Scope:
    return Scope(tiny_model(layout))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9, 5 and 7 tokens, right padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 90, (3, 9), generator=g)
    mask = torch.zeros_like(ids)
    for row, length in enumerate((9, 5, 7)):
        mask[row, :length] = 1
    ids[0, 0] = ids[1, 0] = ids[2, 0] = 2    # OPT's </s> first
    return ids.masked_fill(mask == 0, 1), mask


def write_at(position: torch.Tensor | int, name: str, head: int | None, value: float):
    """A hook that sets ``name`` (one head of it, or all) at ``position`` of every row to ``value``."""
    def put(act, hook):
        out = act.clone()
        rows = torch.arange(len(out))
        if head is None:
            out[rows, position] = value
        else:
            out[rows, position, head] = value
        return out
    return put


@pytest.mark.parametrize("site", [("z", 1, 2), ("mlp_out", 0, None), ("resid_post", 1, None)])
def test_an_intervention_at_the_last_token_matches_the_full_forward(scope, site):
    kind, layer, head = site
    ids, mask = batch()
    name = act_name(kind, layer)
    full = last_token_logits(scope, ids, mask, {name: write_at(last_positions(mask), name, head, 0.7)})
    cached = LastToken(scope, ids, mask)
    assert torch.allclose(cached.logits({name: write_at(LastToken.position, name, head, 0.7)}), full, atol=1e-5)
    assert not torch.allclose(cached.logits(), full, atol=1e-3)      # the intervention does something


def test_runs_on_one_cache_do_not_leak_into_each_other(scope):
    ids, mask = batch()
    cached = LastToken(scope, ids, mask)
    clean = cached.logits()
    name = act_name("mlp_out", 1)
    cached.logits({name: write_at(LastToken.position, name, None, 5.0)})
    assert torch.allclose(cached.logits(), clean, atol=0)
    assert torch.allclose(clean, last_token_logits(scope, ids, mask), atol=1e-5)
