"""An independent OPT forward written from the weights (the reference the hook tests compare to),
a tiny word-level tokenizer for the tiny models, and the tests that pin the reference to HF.

The reference reads only parameters (never calls HF modules' forward) and writes every
activation under its hook name, so a mistake in where a hook sits shows up as a mismatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_model
from einops import einsum, rearrange
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def word_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """Words "w4" ... "w{vocab_size-1}" are ids 4..; prepends BOS "</s>" (id 2) like OPT's tokenizer."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _ln(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _lin(x, linear):
    return F.linear(x, linear.weight, linear.bias)


def reference_activations(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every hook's value, recomputed from OPT's equations with right padding; fp32, no grad."""
    cfg, dec = model.config, model.model.decoder
    assert cfg.activation_function == "relu"
    acts = {}
    with torch.no_grad():
        embed = dec.embed_tokens.weight[input_ids]
        if dec.project_in is not None:
            embed = embed @ dec.project_in.weight.T
        positions = (attention_mask.cumsum(1) * attention_mask - 1) + 2      # OPT's offset of 2
        acts["hook_embed"], acts["hook_pos_embed"] = embed, dec.embed_positions.weight[positions]
        x = embed + acts["hook_pos_embed"]
        T = input_ids.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
        for l, layer in enumerate(dec.layers):
            b, attn, H = f"blocks.{l}.", layer.self_attn, cfg.num_attention_heads
            acts[b + "hook_resid_pre"] = x
            a_in = _ln(x, layer.self_attn_layer_norm) if cfg.do_layer_norm_before else x
            q, k, v = (rearrange(_lin(a_in, p), "b t (h e) -> b t h e", h=H)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            scores = einsum(q, k, "b q h e, b k h e -> b h q k") / q.shape[-1] ** 0.5
            pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            z = einsum(pattern, v, "b h q k, b k h e -> b q h e")
            attn_out = _lin(rearrange(z, "b t h e -> b t (h e)"), attn.out_proj)
            mid = x + attn_out
            if not cfg.do_layer_norm_before:
                mid = _ln(mid, layer.self_attn_layer_norm)
            m_in = _ln(mid, layer.final_layer_norm) if cfg.do_layer_norm_before else mid
            pre = _lin(m_in, layer.fc1)
            post = pre.relu()
            mlp_out = _lin(post, layer.fc2)
            x = mid + mlp_out
            if not cfg.do_layer_norm_before:
                x = _ln(x, layer.final_layer_norm)
            acts.update({b + "attn.hook_q": q, b + "attn.hook_k": k, b + "attn.hook_v": v,
                         b + "attn.hook_pattern": pattern, b + "attn.hook_z": z, b + "hook_attn_out": attn_out,
                         b + "hook_resid_mid": mid, b + "mlp.hook_pre": pre, b + "mlp.hook_post": post,
                         b + "hook_mlp_out": mlp_out, b + "hook_resid_post": x})
        if dec.final_layer_norm is not None:
            x = acts["ln_final.hook_normalized"] = _ln(x, dec.final_layer_norm)
        if dec.project_out is not None:
            x = x @ dec.project_out.weight.T
        acts["hook_logits"] = x @ model.lm_head.weight.T
    return acts


def test_reference_matches_hf_logits_and_hidden_states(layout, token_ids):
    model = tiny_model(layout)
    mask = torch.ones_like(token_ids)
    ref = reference_activations(model, token_ids, mask)
    model.set_attn_implementation("eager")
    out = model(input_ids=token_ids, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(ref["hook_logits"], out.logits, atol=1e-5, rtol=0)
    n = model.config.num_hidden_layers
    for l in range(n):
        torch.testing.assert_close(ref[f"blocks.{l}.hook_resid_pre"], out.hidden_states[l], atol=1e-5, rtol=0)
        torch.testing.assert_close(ref[f"blocks.{l}.attn.hook_pattern"], out.attentions[l], atol=1e-5, rtol=0)


def test_word_tokenizer_prepends_bos():
    assert word_tokenizer()(["w5 w6"])["input_ids"] == [[2, 5, 6]]
