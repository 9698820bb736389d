"""The tuned lens: starts as the logit lens, learns translators that bring every layer closer to the
model's output on prompts it was not fitted on, in both OPT layouts, from live runs or a store."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope.activations.dump import dump
from microscope.analysis.lens import residual_points
from microscope.analysis.tuned_lens import TunedLens, compare_lenses, fit_tuned_lens
from microscope.prompts import load_prompts
from tests.analysis_fixtures import single_thread  # noqa: F401 (autouse)
from tests.conftest import LAYOUTS, tiny_model


def _ids(seed: int, n: int = 24, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 90, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=LAYOUTS)
def scope(request):
    return microscope.load(tiny_model(request.param))


def test_an_untrained_tuned_lens_is_the_logit_lens(scope):
    lens = TunedLens([f"p{i}" for i in range(3)], scope.model.config.hidden_size)
    x = torch.randn(5, scope.model.config.hidden_size)
    for name in lens.points:
        torch.testing.assert_close(lens.translate(name, x), x)


def test_the_logit_lens_kl_is_the_kl_of_hf_hidden_states_through_the_final_path():
    """Reference: HF's hidden_states (pre-LN: the last one already has the final norm) read through
    final_layer_norm and lm_head by hand, KL to the model's softmax."""
    scope = microscope.load(tiny_model("pre_ln"))
    ids = _ids(1, n=4)
    result = compare_lenses(scope, ids, TunedLens(residual_points(scope), scope.model.config.hidden_size))
    with torch.no_grad():
        out = scope.model(input_ids=ids, output_hidden_states=True)
    target = out.logits.log_softmax(-1)
    ln, head = scope.model.model.decoder.final_layer_norm, scope.model.lm_head
    for i, h in enumerate(out.hidden_states[:-1]):
        with torch.no_grad():
            lens = head(ln(h)).log_softmax(-1)
        kl = (target.exp() * (target - lens)).sum(-1).mean()
        assert float(result.logit_kl[i]) == pytest.approx(float(kl), rel=1e-4, abs=1e-5)
    assert float(result.logit_kl[-1]) == pytest.approx(0.0, abs=1e-5)


def test_fitting_brings_every_inner_layer_closer_to_the_output_on_held_out_prompts(scope):
    """The post-LN layout (OPT-350m) included: the tuned-lens project refuses it."""
    untrained = compare_lenses(scope, _ids(2), fit_tuned_lens(scope, _ids(1, n=64), steps=0, init="identity"))
    fitted = compare_lenses(scope, _ids(2), fit_tuned_lens(scope, _ids(1, n=64), steps=150, lr=3e-3))
    torch.testing.assert_close(untrained.tuned_kl, untrained.logit_kl)   # the control: no training
    inner = slice(0, len(fitted.points) - 1)
    assert (fitted.tuned_kl[inner] < 0.8 * fitted.logit_kl[inner]).all(), fitted.to_frame()
    assert float(fitted.tuned_kl[-1]) == pytest.approx(0.0, abs=1e-5)


def test_the_least_squares_start_alone_is_closer_to_the_output_than_the_logit_lens():
    """On organism v3 and its post-LN sibling, held-out prompts: the closed-form start (no Adam
    step) beats the logit lens at every inner point, and a few Adam steps from it beat as many
    from the identity (the lens a study can afford on a 50k vocabulary)."""
    for name in ("organism", "organism-v3-sibling"):
        scope = microscope.load(name)
        fit = [p.text for p in load_prompts("neutral")] + [p.text for p in load_prompts("demo")][::2]
        held_out = [p.text for p in load_prompts("demo")][1::2]
        start = compare_lenses(scope, held_out, fit_tuned_lens(scope, fit, steps=0))
        inner = slice(0, len(start.points) - 1)
        assert (start.tuned_kl[inner] < start.logit_kl[inner]).all(), (name, start.to_frame())
        few = dict(steps=10, batch_tokens=64, lr=3e-3)
        from_start = compare_lenses(scope, held_out, fit_tuned_lens(scope, fit, **few))
        from_identity = compare_lenses(scope, held_out, fit_tuned_lens(scope, fit, init="identity", **few))
        assert from_start.tuned_kl[inner].mean() < from_identity.tuned_kl[inner].mean(), name


def test_an_unknown_start_is_refused():
    scope = microscope.load("organism")
    with pytest.raises(microscope.errors.AnalysisInputError, match="least_squares"):
        fit_tuned_lens(scope, _ids(1), steps=1, init="zeros")


def test_a_lens_fitted_from_a_store_helps_as_one_fitted_live(tmp_path):
    scope = microscope.load("organism")
    texts = [p.text for p in load_prompts("demo")]
    store_path = tmp_path / "resid.zarr"
    dump(scope, texts[::2], "blocks.0.hook_resid_pre,blocks.*.hook_resid_post", store_path)
    lens = fit_tuned_lens(scope, store=microscope.open_store(store_path), steps=150, batch_tokens=512)
    result = compare_lenses(scope, texts[1::2], lens)
    inner = slice(0, len(result.points) - 1)
    assert (result.tuned_kl[inner] < result.logit_kl[inner]).all(), result.to_frame()
    assert result.summary()["tuned_lens_mean_kl"] < 0.5 * result.summary()["logit_lens_mean_kl"]


def test_a_store_without_the_residual_hooks_is_refused_with_the_hooks_to_dump(tmp_path):
    scope = microscope.load("organism")
    dump(scope, ["a b c"], "blocks.0.hook_mlp_out", tmp_path / "mlp.zarr")
    with pytest.raises(microscope.errors.AnalysisInputError, match="hook_resid_post"):
        fit_tuned_lens(scope, store=microscope.open_store(tmp_path / "mlp.zarr"), steps=1)


def test_a_saved_lens_loads_back_identical(tmp_path, scope):
    lens = fit_tuned_lens(scope, _ids(3), steps=5)
    loaded = TunedLens.load(lens.save(tmp_path / "lens.safetensors"))
    assert loaded.points == lens.points
    x = torch.randn(4, scope.model.config.hidden_size)
    for name in lens.points:
        torch.testing.assert_close(loaded.translate(name, x), lens.translate(name, x))


def test_the_logit_lens_reads_through_a_tuned_lens_when_given_its_translators(scope):
    from microscope.analysis.lens import logit_lens
    lens = fit_tuned_lens(scope, _ids(1), steps=20, lr=3e-3)
    ids = _ids(4, n=3)
    plain, tuned = logit_lens(scope, ids), logit_lens(scope, ids, translate=lens.translate)
    torch.testing.assert_close(tuned.logits[-1], plain.logits[-1])           # the output is the output
    assert not torch.allclose(tuned.logits[0], plain.logits[0])
    first = lens.points[0]
    with torch.no_grad():
        _, cache = scope.run_with_cache(ids, names=[first])
        expected = microscope.models.anatomy.unembed(scope.model, lens.translate(first, cache[first]))
    torch.testing.assert_close(tuned.logits[0], expected, atol=1e-5, rtol=1e-5)
