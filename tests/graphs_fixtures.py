"""Helpers shared by the tests/test_graphs_*.py files (no tests here): one thread, transcoders for
tiny random OPTs (random weights: exactness holds for any transcoder), trained ones for the
organism and its post-LN sibling, and the plain-HF references the graphs are checked against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import microscope as ms
from microscope.activations.dump import dump
from microscope.analysis.features.coder import Dictionary, new_coder
from microscope.analysis.graphs.transcoders import Transcoders, mlp_hooks, train_transcoders

QUICK = dict(steps=150, batch_size=256, k=16, expansion_factor=8, dead_tokens=20_000, checkpoint_every=150)
TOXICITY = 'Laura was bitter. Laura turned to David and said, "You are such a'
REPETITION = "river Tom door James tunnel coffee river Tom door James tunnel coffee river Tom"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread (tiny matrices; a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_transcoders(model, n_latents: int = 48, k: int = 6, seed: int = 0) -> Transcoders:
    """One transcoder per block with random encoder, decoder and biases (none trained)."""
    width = model.config.hidden_size
    out = []
    for layer in range(model.config.num_hidden_layers):
        coder = new_coder(width, n_latents=n_latents, k=k, transcode=True, seed=seed + layer)
        g = torch.Generator().manual_seed(100 + seed + layer)
        with torch.no_grad():
            coder.encoder.bias.copy_(torch.randn(n_latents, generator=g) * 0.1)
            coder.W_dec.copy_(torch.randn(n_latents, width, generator=g) * 0.3)
            coder.b_dec.copy_(torch.randn(width, generator=g) * 0.1)
        out.append(Dictionary(coder.eval(), *mlp_hooks(layer)))
    return Transcoders(out)


def trained_transcoders(scope, root: Path) -> tuple[Transcoders, object]:
    """(transcoders, store): every block's MLP hooks dumped on the demo prompts, one quick
    transcoder per block trained on them."""
    store_path = root / "store.zarr"
    dump(scope, "demo", "blocks.*.hook_resid_mid,blocks.*.hook_mlp_out", str(store_path), dtype="fp32")
    store = ms.open_store(str(store_path))
    return train_transcoders(store, root / "transcoders", **QUICK), store


def plain_mlp_inputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each block's transcoder input [L, T, d], logits [T, vocab]) of one prompt by a plain HF
    forward with plain torch hooks: pre-LN, the input of the MLP's LayerNorm; post-LN, the output
    of the attention LayerNorm."""
    pre_ln = model.config.do_layer_norm_before
    seen, handles = {}, []
    for l, layer in enumerate(model.model.decoder.layers):
        if pre_ln:
            handles.append(layer.final_layer_norm.register_forward_pre_hook(
                lambda m, args, l=l: seen.__setitem__(l, args[0].detach().clone())))
        else:
            handles.append(layer.self_attn_layer_norm.register_forward_hook(
                lambda m, args, out, l=l: seen.__setitem__(l, out.detach().clone())))
    try:
        with torch.no_grad():
            logits = model(ids.reshape(1, -1)).logits[0]
    finally:
        for h in handles:
            h.remove()
    T = ids.numel()
    return torch.stack([seen[l].reshape(T, -1) for l in range(len(seen))]), logits
