"""The OPT family: the nine sizes of the OPT paper (Table 1), their Hugging Face configs,
parameter counts computed from the shapes, and weight-memory estimates.

    >>> from microscope.models.family import family, opt_config
    >>> family().loc["opt-350m", "params"]
    331196416
    >>> opt_config("350m").do_layer_norm_before
    False
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from transformers import OPTConfig

from microscope.errors import UnknownSizeError

VOCAB_ROWS = 50272  # embedding rows (the tokenizer has 50265 entries; padded to a multiple of 8)
MAX_POSITIONS = 2048  # context length
POSITION_OFFSET = 2  # OPT's learned positions start at index 2, so the table has 2050 rows
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclass(frozen=True)
class FamilySize:
    """One OPT size: shapes from the released configs, training settings from the paper."""

    name: str  # "opt-125m"
    layers: int
    heads: int
    d_model: int
    peak_lr: float
    batch_tokens: int  # tokens per optimiser step
    word_embed_proj_dim: int | None = None  # only 350m differs from d_model (512)
    post_ln: bool = False  # only 350m: LayerNorm after each sublayer, no final norm

    @property
    def ffn(self) -> int:
        return 4 * self.d_model

    @property
    def d_head(self) -> int:
        return self.d_model // self.heads

    @property
    def d_embed(self) -> int:
        """Width of the token embedding (projected to d_model by project_in when different)."""
        return self.word_embed_proj_dim or self.d_model

    @property
    def params(self) -> int:
        """Parameter count computed from the shapes (lm_head is tied to the token embedding)."""
        d, f, e = self.d_model, self.ffn, self.d_embed
        embeddings = VOCAB_ROWS * e + (MAX_POSITIONS + POSITION_OFFSET) * d
        projections = 2 * e * d if e != d else 0  # project_in and project_out, no bias
        attention = 4 * (d * d + d)  # q, k, v, out with biases
        mlp = (d * f + f) + (f * d + d)  # fc1, fc2 with biases
        layer_norms = 2 * (2 * d)  # self_attn_layer_norm, final_layer_norm of the block
        final_norm = 0 if self.post_ln else 2 * d
        return embeddings + projections + self.layers * (attention + mlp + layer_norms) + final_norm

    def weight_bytes(self, dtype: str) -> int:
        """Bytes taken by the weights alone in `dtype` (one of fp32, fp16, bf16, int8)."""
        return self.params * BYTES_PER_PARAM[dtype]


SIZES: dict[str, FamilySize] = {s.name: s for s in [
    FamilySize("opt-125m", 12, 12, 768, 6e-4, 500_000),
    FamilySize("opt-350m", 24, 16, 1024, 3e-4, 500_000, word_embed_proj_dim=512, post_ln=True),
    FamilySize("opt-1.3b", 24, 32, 2048, 2e-4, 1_000_000),
    FamilySize("opt-2.7b", 32, 32, 2560, 1.6e-4, 1_000_000),
    FamilySize("opt-6.7b", 32, 32, 4096, 1.2e-4, 2_000_000),
    FamilySize("opt-13b", 40, 40, 5120, 1e-4, 4_000_000),
    FamilySize("opt-30b", 48, 56, 7168, 1e-4, 4_000_000),
    FamilySize("opt-66b", 64, 72, 9216, 0.8e-4, 2_000_000),
    FamilySize("opt-175b", 96, 96, 12288, 1.2e-4, 2_000_000),
]}


def family_size(name: str) -> FamilySize:
    """The size called `name`: "opt-1.3b", "1.3b", "OPT-1.3B" and "facebook/opt-1.3b" all work."""
    key = name.strip().lower().removeprefix("facebook/")
    key = key if key.startswith("opt-") else f"opt-{key}"
    if key not in SIZES:
        raise UnknownSizeError(
            f"unknown OPT size {name!r}; valid sizes: {', '.join(SIZES)} (the 'opt-' prefix is optional)")
    return SIZES[key]


def opt_config(size: str | FamilySize) -> OPTConfig:
    """The Hugging Face `OPTConfig` of a family size, field for field as in the released
    `facebook/opt-*` config.json files (opt-175b, not on the hub, follows the same pattern)."""
    s = size if isinstance(size, FamilySize) else family_size(size)
    return OPTConfig(
        vocab_size=VOCAB_ROWS, max_position_embeddings=MAX_POSITIONS,
        hidden_size=s.d_model, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        ffn_dim=s.ffn, word_embed_proj_dim=s.d_embed, do_layer_norm_before=not s.post_ln,
        activation_function="relu", dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
        layerdrop=0.0, init_std=0.02, enable_bias=True, layer_norm_elementwise_affine=True,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, prefix="</s>", use_cache=True,
        architectures=["OPTForCausalLM"], dtype="float16",
    )


def family() -> pd.DataFrame:
    """The nine OPT sizes as a table indexed by name: shapes, the paper's peak learning rate and
    batch size (tokens), parameter count, and weight memory in GB (1e9 bytes) per dtype."""
    rows = []
    for s in SIZES.values():
        row = {"layers": s.layers, "heads": s.heads, "d_model": s.d_model, "ffn": s.ffn,
               "d_head": s.d_head, "d_embed": s.d_embed, "layout": "post-LN" if s.post_ln else "pre-LN",
               "peak_lr": s.peak_lr, "batch_tokens": s.batch_tokens, "params": s.params}
        row.update({f"weights_gb_{dt}": s.weight_bytes(dt) / 1e9 for dt in BYTES_PER_PARAM})
        rows.append(row)
    return pd.DataFrame(rows, index=pd.Index(list(SIZES), name="size"))


def family_markdown() -> str:
    """`family()` as a Markdown table (the one in docs/loading.md), parameters in millions."""
    header = ("| size | layout | layers | heads | d_model | ffn | d_head | peak LR | batch (tokens) "
              "| params | fp32 GB | fp16/bf16 GB | int8 GB |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for name, r in family().iterrows():
        lines.append(f"| {name} | {r.layout} | {r.layers} | {r.heads} | {r.d_model} | {r.ffn} | {r.d_head} "
                     f"| {r.peak_lr * 1e4:g}e-4 | {r.batch_tokens / 1e6:g}M | {r.params / 1e6:,.1f}M "
                     f"| {r.weights_gb_fp32:,.2f} | {r.weights_gb_fp16:,.2f} | {r.weights_gb_int8:,.2f} |")
    return "\n".join(lines)
