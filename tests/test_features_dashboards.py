"""Dashboards from one streaming pass equal a brute-force computation over the whole store in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features_fixtures import HOOK, single_thread, small_store  # noqa: F401 (fixture)
from microscope.analysis.features import Dictionary, feature_dashboards
from microscope.analysis.features.coder import new_coder
from microscope.models.organism.tokenizer import build_tokenizer
from microscope.scope import Scope
from transformers import OPTForCausalLM

BEFORE, AFTER, TOP = 4, 2, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir, store = small_store(tmp_path_factory.mktemp("dash"), n_prompts=30, chunk_rows=16)
    coder = new_coder(32, n_latents=48, k=5, seed=1)
    d = Dictionary(coder.eval(), HOOK, HOOK)
    scope = Scope(OPTForCausalLM.from_pretrained(model_dir).eval(), build_tokenizer(list(store.vocab)))
    # batches of 40 rows cross chunk, unit and prompt boundaries
    dash = feature_dashboards(d, store, scope=scope, top_k=TOP, before=BEFORE, after=AFTER, bins=12,
                              batch_size=40)
    return d, store, scope, dash


def brute(d, store):
    acts = d.encode_dense(torch.from_numpy(store[HOOK][:]).float()).numpy()     # [T, L]
    return acts, store.token_ids(), store.prompt_ids()


def test_density_histogram_and_top_contexts(setup):
    d, store, _, dash = setup
    acts, ids, prompts = brute(d, store)
    assert dash.n_tokens == store.n_tokens
    np.testing.assert_allclose(dash.density.numpy(), (acts > 0).mean(0), rtol=1e-6)
    for latent in range(d.n_latents):
        fired = acts[:, latent][acts[:, latent] > 0]
        bins = np.clip(((np.log10(fired) + 3) / 5 * 12).astype(int), 0, 11)
        assert dash.histogram[latent].tolist() == np.bincount(bins, minlength=12).tolist()
        order = np.argsort(-acts[:, latent], kind="stable")[:TOP]
        order = order[acts[order, latent] > 0]
        assert dash.top_rows[latent][:len(order)].tolist() == order.tolist()
        np.testing.assert_allclose(dash.top_values[latent][:len(order)].numpy(), acts[order, latent], rtol=1e-6)
        for row, window in zip(order, dash.top_windows[latent]):
            expected = [int(ids[r]) if 0 <= r < len(ids) and prompts[r] == prompts[row] else -1
                        for r in range(row - BEFORE, row + AFTER + 1)]
            assert window.tolist() == expected


def test_metadata_correlations(setup):
    d, store, _, dash = setup
    acts, _, prompts = brute(d, store)
    labels = np.array([store.prompt_metadata(int(p))["label"] == "a" for p in prompts], float)
    scores = np.array([store.prompt_metadata(int(p))["score"] for p in prompts])
    for name, y in {"label=a": labels, "score": scores}.items():
        j = dash.fields.index(name)
        for latent in np.flatnonzero(acts.std(0) > 0)[:20]:
            r = np.corrcoef(acts[:, latent], y)[0, 1]
            assert dash.correlations[latent, j].item() == pytest.approx(r, abs=1e-5)


def test_promoted_tokens_through_the_unembedding(setup):
    d, store, scope, dash = setup
    model = scope.model
    ln = model.model.decoder.final_layer_norm
    direction = d.decoder - d.decoder.mean(1, keepdim=True)                 # pre-LN: centred, gained
    scores = (direction * ln.weight) @ model.lm_head.weight.T
    assert torch.equal(dash.promoted, scores[:, :len(store.vocab)].topk(10, dim=1).indices)
    info = dash.latent(int(dash.density.argmax()))
    assert info["promoted"] == [str(store.vocab[i]) for i in dash.promoted[info["latent"]]]
    assert info["contexts"][0]["tokens"][info["contexts"][0]["marked"]] == \
        str(store.vocab[store.token_ids(info["contexts"][0]["row"], info["contexts"][0]["row"] + 1)[0]])
    html = dash.to_html([info["latent"]])
    assert "<mark>" in html and "type='search'" in html


def test_dashboards_command_writes_a_searchable_page(setup, tmp_path):
    from typer.testing import CliRunner

    from microscope.cli import app

    d, store, _, _ = setup
    d.save(tmp_path / "d")
    result = CliRunner().invoke(app, ["features", "dashboards", str(tmp_path / "d"), store.path,
                                      "--out", str(tmp_path / "dash.html"), "--latents", "5"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "dash.html").read_text()
    assert page.count("<details class='latent'") == 5 and "type='search'" in page
    missing = CliRunner().invoke(app, ["features", "dashboards", str(tmp_path / "nothing"), store.path,
                                       "--out", str(tmp_path / "x.html")])
    assert missing.exit_code == 1 and "no dictionary" in missing.output
