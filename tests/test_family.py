"""The OPT family registry: shapes, configs, parameter counts and memory estimates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import OPTForCausalLM

from microscope.errors import MicroscopeError
from microscope.models.family import SIZES, family, family_markdown, family_size, opt_config

# The paper's nominal sizes (Table 1 names them) and shapes.
NOMINAL = {"opt-125m": 125e6, "opt-350m": 350e6, "opt-1.3b": 1.3e9, "opt-2.7b": 2.7e9, "opt-6.7b": 6.7e9,
           "opt-13b": 13e9, "opt-30b": 30e9, "opt-66b": 66e9, "opt-175b": 175e9}
PAPER_TABLE_1 = {  # layers, heads, d_model, peak LR, batch tokens
    "opt-125m": (12, 12, 768, 6e-4, 0.5e6), "opt-350m": (24, 16, 1024, 3e-4, 0.5e6),
    "opt-1.3b": (24, 32, 2048, 2e-4, 1e6), "opt-2.7b": (32, 32, 2560, 1.6e-4, 1e6),
    "opt-6.7b": (32, 32, 4096, 1.2e-4, 2e6), "opt-13b": (40, 40, 5120, 1e-4, 4e6),
    "opt-30b": (48, 56, 7168, 1e-4, 4e6), "opt-66b": (64, 72, 9216, 0.8e-4, 2e6),
    "opt-175b": (96, 96, 12288, 1.2e-4, 2e6)}
# facebook/opt-125m/config.json and facebook/opt-350m/config.json as published on the hub.
HUB_CONFIG_125M = {"activation_dropout": 0.0, "activation_function": "relu", "attention_dropout": 0.0,
                   "bos_token_id": 2, "do_layer_norm_before": True, "dropout": 0.1, "eos_token_id": 2,
                   "ffn_dim": 3072, "hidden_size": 768, "init_std": 0.02, "layerdrop": 0.0,
                   "max_position_embeddings": 2048, "num_attention_heads": 12, "num_hidden_layers": 12,
                   "pad_token_id": 1, "prefix": "</s>", "vocab_size": 50272, "word_embed_proj_dim": 768}
HUB_CONFIG_350M = {**HUB_CONFIG_125M, "do_layer_norm_before": False, "ffn_dim": 4096, "hidden_size": 1024,
                   "num_attention_heads": 16, "num_hidden_layers": 24, "word_embed_proj_dim": 512}


def test_family_table_has_the_nine_sizes_of_the_paper():
    table = family()
    assert list(table.index) == list(PAPER_TABLE_1)
    for name, (layers, heads, d_model, lr, batch) in PAPER_TABLE_1.items():
        row = table.loc[name]
        assert (row.layers, row.heads, row.d_model, row.peak_lr, row.batch_tokens) == (layers, heads, d_model, lr, batch)
        assert row.ffn == 4 * d_model and row.d_head * heads == d_model


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_count_equals_the_hf_model_built_on_meta(name):
    with torch.device("meta"):
        model = OPTForCausalLM(opt_config(name))
    assert family().loc[name, "params"] == sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_nominal_sizes():
    params = family()["params"]
    assert abs(params["opt-125m"] / 125e6 - 1) < 0.01
    assert abs(params["opt-175b"] / 175e9 - 1) < 0.01
    for name, nominal in NOMINAL.items():  # 350m is the loosest: 331M
        assert abs(params[name] / nominal - 1) < 0.06, name


def test_memory_estimates_are_parameters_times_bytes():
    table = family()
    for col, nbytes in {"weights_gb_fp32": 4, "weights_gb_fp16": 2, "weights_gb_bf16": 2, "weights_gb_int8": 1}.items():
        assert (table[col] == table["params"] * nbytes / 1e9).all()
    assert 345 < table.loc["opt-175b", "weights_gb_fp16"] < 355  # "about 350 GB"


@pytest.mark.parametrize("name,hub", [("opt-125m", HUB_CONFIG_125M), ("opt-350m", HUB_CONFIG_350M)])
def test_opt_config_equals_the_published_config(name, hub):
    config = opt_config(name).to_dict()
    assert {k: config[k] for k in hub} == hub


def test_350m_is_post_ln_with_projections_and_no_final_norm():
    with torch.device("meta"):
        decoder = OPTForCausalLM(opt_config("350m")).model.decoder
    assert decoder.project_in.weight.shape == (1024, 512) and decoder.project_out.weight.shape == (512, 1024)
    assert decoder.final_layer_norm is None
    assert family().loc["opt-350m", "layout"] == "post-LN"


@pytest.mark.parametrize("alias", ["opt-1.3b", "1.3b", "OPT-1.3B", "facebook/opt-1.3b"])
def test_size_aliases(alias):
    assert family_size(alias).name == "opt-1.3b"


def test_unknown_size_lists_the_valid_ones():
    with pytest.raises(MicroscopeError, match="opt-125m, opt-350m.*opt-175b"):
        family_size("opt-7b")


def test_the_docs_show_the_current_family_table():
    docs = (Path(__file__).parents[1] / "docs" / "loading.md").read_text()
    assert family_markdown() in docs
