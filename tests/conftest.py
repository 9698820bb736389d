"""Shared fixtures: tiny OPT models in every layout the family has.

- ``pre_ln``: the layout of every OPT size but 350m (final LayerNorm, no projections).
- ``post_ln``: the 350m layout (LayerNorm after each sublayer, no final norm,
  ``word_embed_proj_dim`` < ``hidden_size`` so ``project_in``/``project_out`` exist).
- ``odd``: pre-LN with widths that are not powers of two and a projection width
  different from the hidden width.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

TINY_CONFIGS: dict[str, dict] = {
    "pre_ln": dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, ffn_dim=128,
                   num_attention_heads=4, word_embed_proj_dim=32, do_layer_norm_before=True),
    "post_ln": dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, ffn_dim=128,
                    num_attention_heads=4, word_embed_proj_dim=16, do_layer_norm_before=False),
    "odd": dict(vocab_size=101, hidden_size=36, num_hidden_layers=2, ffn_dim=100,
                num_attention_heads=3, word_embed_proj_dim=20, do_layer_norm_before=True),
}
LAYOUTS = list(TINY_CONFIGS)

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # `make test` runs one process per core: each keeps to its share of the cores, and so do the
    # processes it starts (notebook kernels, the demo, torchrun's ranks), since spinning OpenMP
    # threads on a busy core slow a test several-fold
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))


def tiny_config(layout: str = "pre_ln", **overrides) -> OPTConfig:
    """A small OPTConfig of the named layout, dropout off, eval-ready."""
    kwargs = dict(TINY_CONFIGS[layout], max_position_embeddings=64, dropout=0.0,
                  attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
                  bos_token_id=2, eos_token_id=2, init_std=0.2)
    kwargs.update(overrides)
    return OPTConfig(**kwargs)


def tiny_model(layout: str = "pre_ln", seed: int = 0, **overrides) -> OPTForCausalLM:
    """A randomly initialised tiny OPTForCausalLM (fp32, eval mode), deterministic per seed."""
    torch.manual_seed(seed)
    model = OPTForCausalLM(tiny_config(layout, **overrides))
    return model.eval()


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


@pytest.fixture
def model(layout) -> OPTForCausalLM:
    return tiny_model(layout)


@pytest.fixture
def token_ids() -> torch.Tensor:
    """A batch of 3 prompts x 10 tokens of ids in [3, 90) (no pad/bos ids)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 90, (3, 10), generator=g)


@pytest.fixture(scope="session")
def opt_bpe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random weights of both OPT layouts with OPT's BPE (the GPT-2 stand-in) and 128 positions,
    saved as HF folders: what a user's checkpoint looks like to the studies, small enough for CI."""
    from microscope.models.tokenizer import standin_tokenizer

    folders = {}
    for layout in ("pre_ln", "post_ln"):
        folder = tmp_path_factory.mktemp("checkpoints") / f"opt-random-{layout}"
        tiny_model(layout, vocab_size=50272, max_position_embeddings=128).save_pretrained(folder)
        standin_tokenizer().save_pretrained(folder)
        folders[layout] = folder
    return folders
