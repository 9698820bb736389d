"""Prompts to token ids, token arguments to id tensors, and position selection.

Shared by every analysis tool so that they all accept the same inputs:

- prompts: a list of strings (tokenised by the scope, right padding) or a LongTensor
  ``[batch, pos]`` of ids (then an optional ``attention_mask`` of the same shape);
- tokens (targets, answers): an int id, a string that is exactly one token, or one of those per
  prompt (list or LongTensor ``[batch]``);
- pairs (a clean prompt and its corrupted partner): `end_aligned`, left padded to one width so
  that each pair meets at its last token whatever the two token lengths;
- positions: ``"last"`` (each prompt's last real token), an int (negative ints count back from
  each prompt's last real token), or ``"all"``;
- word classes (insults, praises, a dialogue marker): words resolved through the model's own
  tokenizer, each by its first token as it follows a space (`word_class_ids`), taken from the
  caller or from the prompt set's task file (`task_value`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from microscope.errors import AnalysisInputError
from microscope.prompts import TASK_SUFFIX, PromptSet, load_task

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


def end_aligned(scope, clean: Sequence[str], corrupt: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """(clean ids, clean mask, corrupt ids, corrupt mask), each [n, pos]: the texts tokenized by
    the scope and left padded to one width, so that every pair is aligned at its last token (a
    clean prompt and its partner may differ in token length, as BPE words do)."""
    right_ids, right_mask = scope.tokenize([*clean, *corrupt])            # right padded, with BOS
    lengths = right_mask.sum(1)
    shift = (right_mask.shape[1] - lengths)[:, None]
    source = (torch.arange(right_mask.shape[1])[None] - shift) % right_mask.shape[1]   # roll right by shift
    ids, mask = right_ids.gather(1, source), right_mask.gather(1, source)
    ids[mask == 0] = scope.config.pad_token_id
    n = len(clean)
    return ids[:n], mask[:n], ids[n:], mask[n:]


def where_present(present: torch.Tensor, source: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``source`` where ``present`` [batch, pos] is true (the source prompt has a token there),
    else ``own`` (the receiving run's value): patched values of end-aligned pairs of unequal length.
    ``source`` and ``own`` are [batch, pos, ...]."""
    keep = present.bool().reshape(*present.shape, *[1] * (source.dim() - present.dim())).to(source.device)
    return torch.where(keep, source, own.to(source))


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """LongTensor [batch]: index of each row's last real (mask == 1) token (right or left padding)."""
    positions = torch.arange(1, attention_mask.shape[-1] + 1, device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def last_token_logits(scope, ids: torch.Tensor, mask: torch.Tensor, hooks: dict | None = None) -> torch.Tensor:
    """Logits [batch, vocab] at each row's last real token (``hooks`` in force), unembedding only
    the trailing positions that hold one (``logits_to_keep``: on a 50k vocabulary the unembedding
    of every position is most of a small model's forward)."""
    last = last_positions(mask)
    keep = int(ids.shape[1] - last.min())
    logits = scope.run(ids, attention_mask=mask, hooks=hooks, logits_to_keep=keep)
    rows = torch.arange(len(ids), device=logits.device)
    return logits[rows, (last - (ids.shape[1] - keep)).to(logits.device)]


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


def first_token_id(scope, text: str) -> int:
    """Id of the first token of ``text`` as it would follow a prompt: after a space, as a word in
    running text (a leading space is added), or -- when ``text`` starts with a newline, as
    ``"\nUser"`` -- at the start of a line (the first token after the newline). Raises if the
    tokenizer maps it to its unknown token."""
    encode = lambda t: scope.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    if text.startswith("\n"):
        newline, ids = encode("\n"), encode("\n" + text.lstrip())
        ids = ids[len(newline):] if ids[:len(newline)] == newline else ids
    else:
        ids = encode(" " + text.lstrip())
    if not ids:
        raise AnalysisInputError(f"{text!r} tokenizes to nothing")
    if scope.tokenizer.unk_token_id is not None and ids[0] == scope.tokenizer.unk_token_id:
        raise AnalysisInputError(f"{text!r} is not in this tokenizer's vocabulary (it maps to the unknown token)")
    return int(ids[0])


def word_class_ids(scope, words: Sequence[str], *, parameter: str,
                   prompts: object = None) -> torch.Tensor:
    """``[n]`` distinct first-token ids of a class of words, each as it follows a space in running
    text (OPT's leading-space ``Ġ`` tokens), or at a line start when written ``"\\nUser"``
    (`first_token_id`). A word of several tokens counts by its first token:
    every metric of the studies is read from one forward pass's last-position logits, under any
    intervention, and a word's first token is where the model commits to it (its full
    probability is at most its first token's). Raises, naming ``parameter`` (and the prompt set
    ``prompts`` when it is a name), when a word is unknown to the tokenizer or tokenizes to nothing."""
    where = f" (prompt set {prompts!r})" if isinstance(prompts, str) else ""
    ids = []
    for word in words:
        try:
            ids.append(first_token_id(scope, word))
        except AnalysisInputError as err:
            raise AnalysisInputError(f"{err}: change {parameter}{where} to words this model's tokenizer "
                                     f"knows") from None
    if not ids:
        raise AnalysisInputError(f"{parameter} is empty{where}: give at least one word")
    return torch.tensor(sorted(set(ids)))


def distinct_word_classes(scope, classes: Mapping[str, Sequence[str]],
                          prompts: object = None) -> dict[str, torch.Tensor]:
    """`word_class_ids` for each named class, refusing classes that share a first token (their
    log-odds would count it on both sides)."""
    ids = {name: word_class_ids(scope, words, parameter=name, prompts=prompts) for name, words in classes.items()}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(ids[a].tolist()) & set(ids[b].tolist()))
            if shared:
                tokens = scope.tokenizer.convert_ids_to_tokens(shared)
                raise AnalysisInputError(f"{a} and {b} share first tokens {tokens}: drop the words that "
                                         f"start with them from one of the two")
    return ids


def task_value(prompts: object, key: str, given: object = None, *, parameter: str | None = None):
    """A study's word class or format: ``given`` when the caller passed one, else entry ``key`` of
    the prompt set's task (`prompts.load_task`: ``<set>.task.json``; a `PromptSet` carries
    it). Raises, naming the parameter
    and the prompt set, when neither has it."""
    if given is not None:
        return given
    named = isinstance(prompts, (str, os.PathLike))
    task = load_task(prompts) if named else prompts.task if isinstance(prompts, PromptSet) else {}
    if key in task:
        return task[key]
    parameter = parameter or key
    where = (f"the prompt set {str(prompts)!r} has no entry {key!r} in its {TASK_SUFFIX}" if named
             else f"these prompts come with no task entry {key!r}")
    raise AnalysisInputError(f"no {parameter} given and {where}: pass {parameter}=..., or give a prompt "
                             f"set whose {TASK_SUFFIX} names {key!r}")
