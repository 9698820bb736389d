"""Prompts to token ids, token arguments to id tensors, and position selection.

Shared by every analysis tool so that they all accept the same inputs:

- prompts: a list of strings (tokenised by the scope, right padding) or a LongTensor
  ``[batch, pos]`` of ids (then an optional ``attention_mask`` of the same shape);
- tokens (targets, answers): an int id, a string that is exactly one token, or one of those per
  prompt (list or LongTensor ``[batch]``);
- positions: ``"last"`` (each prompt's last real token), an int (negative ints count back from
  each prompt's last real token), or ``"all"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from microscope.errors import AnalysisInputError

TextsOrIds = Sequence[str] | torch.Tensor   # texts, or ids [batch, pos]: what `token_batch` takes
Tokens = int | str | Sequence[int] | Sequence[str] | torch.Tensor


def token_batch(scope, prompts: TextsOrIds, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [batch, pos], attention_mask [batch, pos]) for texts or ids, on the CPU."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.ndim == 2 else prompts[None]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape)
        return ids.long(), mask.long()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise AnalysisInputError("no prompts given: pass a list of strings or a [batch, pos] id tensor")
    ids, mask = scope.tokenize(list(prompts))
    return ids.long(), mask.long()


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """LongTensor [batch]: index of each row's last real (mask == 1) token (right padding)."""
    return attention_mask.long().sum(-1) - 1


def select_position(attention_mask: torch.Tensor, position: int | str = "last") -> torch.Tensor:
    """LongTensor [batch]: one position per prompt. ``"last"`` or -1 is the last real token,
    ``-k`` the k-th from each prompt's end, ``k >= 0`` the same index in every prompt."""
    last = last_positions(attention_mask)
    if position == "last":
        return last
    if not isinstance(position, int):
        raise AnalysisInputError(f"position must be 'last' or an int, got {position!r}")
    index = last + 1 + position if position < 0 else torch.full_like(last, position)
    if (index < 0).any() or (index > last).any():
        raise AnalysisInputError(f"position {position} falls outside a prompt (real lengths: "
                                 f"{(last + 1).tolist()})")
    return index


def token_ids(scope, tokens: Tokens, batch: int) -> torch.Tensor:
    """LongTensor [batch] of token ids from an id, a one-token string, or one of those per prompt."""
    if isinstance(tokens, torch.Tensor):
        ids = tokens.long().reshape(-1)
    elif isinstance(tokens, (int, str)):
        ids = torch.tensor([_one_token(scope, tokens)])
    else:
        ids = torch.tensor([_one_token(scope, t) for t in tokens])
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise AnalysisInputError(f"got {ids.numel()} tokens for {batch} prompts: give one, or one per prompt")
    vocab = scope.model.config.vocab_size
    if (ids < 0).any() or (ids >= vocab).any():
        raise AnalysisInputError(f"token ids {ids.tolist()} outside the vocabulary [0, {vocab})")
    return ids.clone()


def _one_token(scope, token: int | str) -> int:
    if isinstance(token, str):
        if scope.tokenizer is None:
            raise AnalysisInputError(f"this scope has no tokenizer: give token ids, not {token!r}")
        ids = scope.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AnalysisInputError(f"{token!r} is {len(ids)} tokens ({ids}); give a string that is "
                                     "exactly one token (mind the leading space) or its id")
        return int(ids[0])
    return int(token)


def decode_token(tokenizer, token_id: int) -> str:
    """The string of one token id, or ``"<id>"`` when the scope has no tokenizer."""
    return tokenizer.decode([int(token_id)]) if tokenizer is not None else f"<{int(token_id)}>"
