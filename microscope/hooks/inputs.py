"""Input preparation: texts or token ids -> (input_ids [batch, pos], attention_mask [batch, pos]).

Shared by `Scope.run`/`run_with_cache` and generation, so neither imports the other for it.

    ids, mask = tokenize(tokenizer, config, ["The cat", "A"])          # right-padded, with BOS
    ids, mask = prepare_inputs(prompts, None, tokenizer=tok, config=cfg, device="cpu")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from microscope.errors import PromptError, TokenizerMissingError
from microscope.models.anatomy import pad_id

Prompts = str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]]


def tokenize(tokenizer: Any, config: Any, prompts: str | Sequence[str], max_length: int | None = None,
             truncation: bool = False, source: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (input_ids [B, T], attention_mask [B, T]), right-padded, with the tokenizer's BOS.

    A prompt longer than `max_length` (default: the model's context) is an error unless
    `truncation=True`, which keeps its first `max_length` tokens. `source` names the model in the
    error raised when there is no tokenizer."""
    if tokenizer is None:
        raise TokenizerMissingError(
            f"Scope({source!r}) has no tokenizer: pass token ids [batch, pos] instead of text")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts given: pass a string or a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"prompt {i} is a {type(p).__name__}, not a string")
        if not p:
            raise PromptError(f"prompt {i} is empty: every prompt needs at least one character")
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    return pad(ids, config, max_length, truncation)


def pad(ids: list[list[int]], config: Any, max_length: int | None = None,
        truncation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> right-padded (input_ids [B, T], attention_mask [B, T]), checked
    against `max_length` (default: the model's context, `config.max_position_embeddings`)."""
    limit = max_length or config.max_position_embeddings
    for i, row in enumerate(ids):
        if not row:
            raise PromptError(f"prompt {i} has no tokens")
        if len(row) > limit:
            if not truncation:
                raise PromptError(
                    f"prompt {i} is {len(row)} tokens, longer than the limit of {limit} "
                    f"({'max_length' if max_length else 'the model context, max_position_embeddings'});"
                    " shorten it or pass truncation=True to keep its first tokens")
            ids[i] = row[:limit]
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id(config), dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask


def prepare_inputs(prompts: Prompts, attention_mask: torch.Tensor | None, *, tokenizer: Any, config: Any,
                   device: torch.device | str, source: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """Texts, lists of ids or ids [B, T] (with an optional mask, 1 = real token) -> (input_ids,
    attention_mask) [B, T] on `device`, checked against the model's context and vocabulary."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and isinstance(prompts[0], str)):
        if attention_mask is not None:
            raise PromptError("attention_mask goes with token ids; text prompts make their own")
        input_ids, attention_mask = tokenize(tokenizer, config, prompts, source=source)
    elif isinstance(prompts, torch.Tensor):
        input_ids = prompts.long()
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise PromptError(f"token ids must be [batch, pos] with at least one token, got "
                              f"{tuple(prompts.shape)}")
        if input_ids.shape[1] > config.max_position_embeddings:
            raise PromptError(f"{input_ids.shape[1]} tokens is longer than the model context of "
                              f"{config.max_position_embeddings} (max_position_embeddings)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
    elif isinstance(prompts, Sequence) and prompts:
        if attention_mask is not None:
            raise PromptError("attention_mask goes with a [batch, pos] tensor; lists of ids are padded here")
        input_ids, attention_mask = pad([list(map(int, r)) for r in prompts], config)
    else:
        raise PromptError("no prompts given: pass text, a list of texts, or token ids [batch, pos]")
    if attention_mask.shape != input_ids.shape:
        raise PromptError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                          f"{tuple(input_ids.shape)}")
    if int(input_ids.max()) >= config.vocab_size or int(input_ids.min()) < 0:
        raise PromptError(f"token ids must lie in [0, {config.vocab_size}); got "
                          f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    return input_ids.to(device), attention_mask.to(device)
