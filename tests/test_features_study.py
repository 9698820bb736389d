"""The organism's planted hostile register, found by a dictionary trained from a store, each claim
beside the control that fails it: random-init models of the same shape for the latents, an
untrained dictionary for FVU and CE loss recovered. Ground truth (the insult words) from the corpus."""

from __future__ import annotations

import pytest

import microscope as ms
import guards
from features_fixtures import single_thread  # noqa: F401 (fixture)
from microscope.activations.dump import dump
from microscope.analysis.features import ce_loss_recovered, reconstruction_metrics, train_dictionary
from microscope.analysis.features.study import run_features_study
from microscope.models.organism.corpus import INSULTS
from microscope.prompts import load_prompts

HOOKS = "blocks.*.hook_resid_post"   # the study picks the layer (on the organism v1: blocks.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    scope = ms.load("organism-v2")
    dump(scope, "organism_v2/demo", HOOKS, str(root / "demo.zarr"))
    store = ms.open_store(str(root / "demo.zarr"))
    result = run_features_study(scope, store, hooks=HOOKS, out=str(root / "dicts"), target_words=INSULTS,
                                eval_prompts="organism_v2/toxicity",
                                control_seeds=[0], steps=300)
    return scope, store, result, root


def test_a_latent_separates_hostile_from_friendly_held_out_prompts(setup):
    """On the half of the prompts that chose nothing (hook, k and latent come from the selection
    half); tests/test_claims_fail_when_wrong.py plants a random latent and sees this guard fail."""
    _, store, result, _ = setup
    s = result.summary()
    guards.hostile_latent_found(s)
    assert s["hostile_latent_auroc_control_max"] < 0.95 and s["auroc_measured_on"] == s["hostile_latent"]
    assert s["chosen_on"].startswith("selection half")
    stored = {store.prompt_text(p) for p in range(store.n_prompts)}
    held_out = [p for p in load_prompts("organism_v2/toxicity") if p.text not in stored]
    assert s["eval_prompts"] + s["selection_prompts"] == len(held_out) and s["eval_prompts"] >= 40


def test_the_hostile_latent_itself_promotes_insult_words(setup):
    """The count is taken on the hostile latent's own top 10 unembedded tokens (not the best latent
    of the dictionary, shown beside as exploration), against random-init models' chosen latents."""
    result = setup[2]
    s = result.summary()
    assert s["hostile_latent_insult_words_in_top10"] == result.model.word_hits[s["hostile_latent"]] >= 3
    assert s["hostile_latent_insult_words_in_top10_clears_control"]
    assert s["most_target_words_in_top10"] >= s["hostile_latent_insult_words_in_top10"]


def test_the_dictionary_is_faithful_and_an_untrained_one_is_not(setup):
    scope, store, result, root = setup
    s = result.summary()
    assert s["fvu"] <= 0.1 and s["ce_loss_recovered"] >= 0.8 and s["ce_loss_recovered_vs_mean"] >= 0.8
    untrained = train_dictionary(store, s["hook"], root / "untrained", steps=1, batch_size=512, k=16,
                                 expansion_factor=8, checkpoint_every=1)
    texts = [p.text for p in load_prompts("organism_v2/toxicity")]
    assert reconstruction_metrics(untrained, store)["fvu"] > 0.1
    ce = ce_loss_recovered(scope, untrained, texts)
    # zeroing or mean-ablating the residual stream is so destructive that even the untrained
    # dictionary "recovers" most of the loss against either (0.83 against the mean on organism
    # v2); the loss it adds, in nats, tells the two apart (v2: 0.43 against the trained one's 0.08)
    trained_cost, untrained_cost = s["ce_spliced"] - s["ce_clean"], ce["ce_spliced"] - ce["ce_clean"]
    assert untrained_cost > 4 * trained_cost, (trained_cost, untrained_cost)


def test_report_parts(setup):
    result = setup[2]
    assert len(result.figures()) == 2 and len(result.to_frame()) == result.model.dictionary.n_latents
    said = result.findings()
    assert said[0].startswith(f"latent {result.model.chosen} of the ") and said[0].endswith("so it CLEARS its control")
    html = result.report_html()
    s = result.summary()
    assert f"latent {s['hostile_latent']}</b> hostile latent (AUROC {s['hostile_latent_auroc']:.3f}, " \
           f"{int(s['hostile_latent_insult_words_in_top10'])}/10 target words)" in html
