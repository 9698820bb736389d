"""Jupyter integration: what a researcher gets when a cache, a store, a result or an experiment run
is the last value of a cell (an HTML summary with shapes, hook lists and numbers). Experiment
runs and study results are checked where they are made, in test_experiments.py."""

from __future__ import annotations

import re

import pytest

import microscope as ms
from microscope.activations.dump import dump

HOOKS = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern"]
PROMPTS = ["x is 3 and y is 4 . x + y =", "x is 12 and y is 9 . x - y ="]


@pytest.fixture(scope="module")
def scope():
    return ms.load("organism")


def test_a_cache_shows_every_hook_with_its_shape(scope):
    _, cache = scope.run_with_cache(PROMPTS, names=HOOKS)
    html = cache._repr_html_()
    for name in cache:
        assert name in html
        assert f"<td>[{'x'.join(map(str, cache[name].shape))}]</td>" in html  # e.g. [2x4x13x13]


def test_a_store_shows_its_hooks_prompts_and_tokens(scope, tmp_path):
    summary = dump(scope, PROMPTS, HOOKS, str(tmp_path / "s.zarr"))
    store = ms.open_store(str(tmp_path / "s.zarr"))
    html = store._repr_html_()
    for name in store:
        assert name in html
    assert str(summary.n_tokens) in html and re.search(r"\b2\b", html)


def test_an_analysis_result_shows_its_summary_and_table(scope):
    from microscope.analysis.lens import logit_lens

    result = logit_lens(scope, PROMPTS[:1], position="last")
    html = result._repr_html_()
    assert type(result).__name__ in html and "<table" in html and ".figures()" in html
