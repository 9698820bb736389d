"""Splicing dictionaries into the model: an identity-like dictionary changes nothing; ablating or
clamping a latent equals the hand computation; a transcoder replaces the MLP output."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from features_fixtures import HOOK, single_thread  # noqa: F401 (fixture)
from microscope.analysis.features import Dictionary, ce_loss_recovered, splice_hooks
from microscope.analysis.features.coder import new_coder
from microscope.scope import Scope
from microscope.models.organism.tokenizer import build_tokenizer
from test_store_fixtures import WORDS

D = 32   # the tiny model's width


@pytest.fixture(scope="module")
def scope():
    return Scope(tiny_model("pre_ln"), build_tokenizer(WORDS), source="tiny")


def identity_dictionary(hook: str = HOOK, target: str | None = None) -> Dictionary:
    """Latents relu(x_i) and relu(-x_i) with k = d: exactly one of each pair is on, so decode(encode(x)) = x."""
    coder = new_coder(D, n_latents=2 * D, k=D)
    eye = torch.eye(D)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.cat([eye, -eye]))
        coder.encoder.bias.zero_()
        coder.W_dec.copy_(torch.cat([eye, -eye]))
        coder.b_dec.zero_()
    return Dictionary(coder, hook, target or hook)


def random_dictionary(seed: int = 0, k: int = 6, transcode: bool = False) -> Dictionary:
    coder = new_coder(D, n_latents=96, k=k, transcode=transcode, seed=seed)
    with torch.no_grad():
        coder.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        coder.W_dec.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return Dictionary(coder, HOOK, HOOK)


def hand_latents(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """TopK SAE encoder written out: relu(W_enc (x - b_dec) + b_enc), all but the k largest zeroed."""
    c = d.coder
    pre = torch.relu((x - c.b_dec) @ c.encoder.weight.T + c.encoder.bias)
    keep = pre.topk(c.cfg.k, dim=-1).indices
    return torch.zeros_like(pre).scatter(-1, keep, pre.gather(-1, keep))


PROMPTS = ["w1 w2 w3 w4 w5", "w9 w8 w7", "w20 w21 w22 w23 w24 w25 w26"]


def test_identity_splice_changes_nothing(scope):
    d = identity_dictionary()
    with torch.no_grad():
        clean = scope.run(PROMPTS)
        spliced = scope.run(PROMPTS, hooks=splice_hooks(d))
        kept = scope.run(PROMPTS, hooks=splice_hooks(d, keep_error=True))
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-5)
    torch.testing.assert_close(kept, clean, rtol=0, atol=1e-5)
    ce = ce_loss_recovered(scope, d, PROMPTS)
    assert ce["ce_spliced"] == pytest.approx(ce["ce_clean"], abs=1e-5)
    assert ce["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_keep_error_without_edits_is_exact_for_any_dictionary(scope):
    with torch.no_grad():
        assert torch.equal(scope.run(PROMPTS), scope.run(PROMPTS, hooks=splice_hooks(random_dictionary(),
                                                                                       keep_error=True)))


@pytest.mark.parametrize("edit", ["ablate", "clamp"])
def test_editing_a_latent_equals_the_hand_computation(scope, edit):
    d = random_dictionary()
    x = torch.randn(4, 7, D, generator=torch.Generator().manual_seed(3))
    latents = hand_latents(d, x)
    latent = int((latents > 0).sum((0, 1)).argmax())            # a latent that fires somewhere
    a = latents[..., latent:latent + 1]
    if edit == "ablate":
        fn = splice_hooks(d, ablate=[latent], keep_error=True)[HOOK]
        expected = x - a * d.coder.W_dec[latent]
    else:
        fn = splice_hooks(d, clamp={latent: 2.5}, keep_error=True)[HOOK]
        expected = x + (2.5 - a) * d.coder.W_dec[latent]
    with torch.no_grad():
        torch.testing.assert_close(fn(x, None), expected.detach(), rtol=0, atol=1e-5)
        # without the error term the output is the decoded edited latents
        edited = latents.clone()
        edited[..., latent] = 0.0 if edit == "ablate" else 2.5
        plain = splice_hooks(d, **({"ablate": [latent]} if edit == "ablate" else {"clamp": {latent: 2.5}}))[HOOK]
        torch.testing.assert_close(plain(x, None), edited @ d.coder.W_dec + d.coder.b_dec, rtol=0, atol=1e-5)


def test_transcoder_splice_replaces_the_output_from_the_input(scope):
    d = identity_dictionary("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    d.coder.cfg.transcode = True           # encode() reads the input as it is (no b_dec shift)
    names = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]
    with torch.no_grad(), scope.hooks(splice_hooks(d)):
        _, cache = scope.run_with_cache(PROMPTS, names=names)
    mask = cache.attention_mask.bool() if hasattr(cache, "attention_mask") else None
    torch.testing.assert_close(cache[names[1]][mask], cache[names[0]][mask], rtol=0, atol=1e-5)
