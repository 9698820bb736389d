"""Hand a whole Scope to TransformerLens or nnsight without copying its weights.

    bridge = to_transformer_lens(scope)   # transformer_lens TransformerBridge, raw (unfolded) values
    lm = to_nnsight(scope)                # nnsight TransformersModel, tokenizer passed explicitly

Both wrap the very `scope.model` object: parameters are shared (same storage), so an edit to a
weight shows in all three. Two side effects to know:
- TransformerLens forces `attn_implementation="eager"` on the model it wraps (its hook_pattern
  needs it), so after `to_transformer_lens` the Scope's model runs eager attention everywhere;
  `scope.model.set_attn_implementation("sdpa")` restores the fast path (and silences TL's patterns).
- nnsight left-pads batches of text; our `scope.tokenize` pads right. Compare by token ids.
Both packages are optional (`pip install opt-microscope[interop]`).
"""

from __future__ import annotations

import copy
from typing import Any

from microscope.errors import TokenizerMissingError
from microscope.scope import Scope


def _tokenizer_for(scope: Scope, library: str):
    if scope.tokenizer is None:
        raise TokenizerMissingError(f"{library} needs a tokenizer and Scope({scope.source!r}) has none; "
                                    "build the Scope with one (microscope.load(..., tokenizer=...))")
    return copy.copy(scope.tokenizer)   # both libraries reconfigure the tokenizer they are given


def to_transformer_lens(scope: Scope) -> Any:
    """A `transformer_lens.model_bridge.TransformerBridge` over `scope.model` (no folding, no copy).

    TransformerLens re-loads a tokenizer from the hub unless it is told the given one already adds
    BOS; the copy handed over says so when it does (OPT's tokenizer prepends `</s>`).
    """
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = _tokenizer_for(scope, "TransformerLens")
    tokenizer.init_kwargs = dict(tokenizer.init_kwargs)
    tokenizer.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        tokenizer.init_kwargs["add_bos_token"] = True
    name = getattr(scope.config, "_name_or_path", "") or "facebook/opt-125m"
    return TransformerBridge.boot_transformers(name, hf_model=scope.model, tokenizer=tokenizer,
                                               device=str(scope.device))


def to_nnsight(scope: Scope) -> Any:
    """An `nnsight.TransformersModel` (task "text-generation") over `scope.model` (no copy)."""
    from nnsight import TransformersModel

    return TransformersModel(scope.model, task="text-generation", tokenizer=_tokenizer_for(scope, "nnsight"))
