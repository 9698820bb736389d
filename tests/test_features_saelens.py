"""docs/features.md tells a SAELens user how to load our weights as a `TopKSAE`: the tensors
renamed and transposed, apply_b_dec_to_input, k. Checked here without sae-lens (it pins
transformer-lens < 4): SAELens' TopKSAE encode/decode written out, fed the converted tensors
read from a saved dictionary's files, equal our dictionary's latents and reconstruction."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from features_fixtures import HOOK, single_thread  # noqa: F401 (fixture)
from microscope.analysis.features import Dictionary, load_dictionary
from microscope.analysis.features.coder import new_coder


def saelens_topk_encode(x, W_enc, b_enc, b_dec, k, apply_b_dec_to_input=True):
    """SAELens TopKSAE.encode: hidden_pre = (x - b_dec) @ W_enc + b_enc; top k, then ReLU."""
    hidden_pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
    values, indices = hidden_pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())


def test_the_documented_conversion_reproduces_our_dictionary(tmp_path):
    coder = new_coder(32, n_latents=128, k=8, seed=2)
    with torch.no_grad():
        coder.b_dec.normal_(0, 0.3)
        coder.encoder.bias.normal_(0, 0.1)
    Dictionary(coder, HOOK, HOOK).save(tmp_path / "d")
    # what the docs say a SAELens user does with the folder
    tensors = load_file(tmp_path / "d" / "sae.safetensors")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    saelens = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
               "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    assert cfg["k"] == 8 and cfg["d_in"] == 32 and not cfg["transcode"]
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    latents = saelens_topk_encode(x, saelens["W_enc"], saelens["b_enc"], saelens["b_dec"], cfg["k"])
    ours = load_dictionary(tmp_path / "d")
    torch.testing.assert_close(latents, ours.encode_dense(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(latents @ saelens["W_dec"] + saelens["b_dec"], ours.coder(x).sae_out,
                               rtol=1e-5, atol=1e-5)
