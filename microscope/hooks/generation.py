"""Generation with hooks and capture: HF `generate` (KV cache) with hook points active at every step.

The prompts are left-padded for generation (HF's requirement for batched decoder-only models).
The prefill step runs the whole prompt; every later step runs one new token against the KV cache,
so hook functions see `[batch, 1, ...]` activations there (patterns `[batch, head, 1, k]`).

Capture records, for each generated token, the activation at the position whose output chose that
token: the prompt's last position for the first new token, then each fed-back token. Captured
tensors are `[batch, new_tokens, ...]`; patterns are `[batch, head, new_tokens, k]` with the key
axis spanning the left-padded prompt plus the generated tokens (zeros where a step saw fewer keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from microscope.hooks.hook_points import HookFns, HookPoint, OPTHookPoints
from microscope.models import anatomy
from microscope.names import is_pattern


@dataclass
class GenerationResult:
    """What `scope.generate` returns.

    sequences: [B, P + N] left-padded prompt then new tokens (HF's layout); prompt_mask: [B, P]
    (1 = real prompt token); new_tokens: [B, N]; texts: the decoded new tokens (None without a
    tokenizer); activations: captured hook name -> [B, N, ...] (see the module docstring).
    """

    sequences: torch.Tensor
    prompt_mask: torch.Tensor
    new_tokens: torch.Tensor
    texts: list[str] | None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        acts = ", ".join(f"{n}: {list(t.shape)}" for n, t in self.activations.items())
        return (f"GenerationResult(batch={self.new_tokens.shape[0]}, new_tokens={self.new_tokens.shape[1]}, "
                f"texts={self.texts!r}, activations={{{acts}}})")


def _left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
    """Right-padded rows -> left-padded rows (same width)."""
    width = input_ids.shape[1]
    ids, mask = torch.full_like(input_ids, pad_id), torch.zeros_like(attention_mask)
    for i, n in enumerate(attention_mask.sum(1).tolist()):
        real = input_ids[i][attention_mask[i].bool()]
        ids[i, width - n:], mask[i, width - n:] = real, 1
    return ids, mask


def generate(model: nn.Module, hook_points: OPTHookPoints, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             *, tokenizer: Any = None, max_new_tokens: int = 32, hooks: HookFns | None = None,
             capture: str | Sequence[str] | None = None, **generate_kwargs: Any) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt with `hooks` active and `capture` hooks recorded.

    input_ids/attention_mask: [B, P] right-padded, on the model's input device (`hooks.inputs`);
    `generate_kwargs` go to HF `generate` (e.g. `do_sample=True, top_p=0.9`); the default is the
    model's generation config (greedy for OPT). `scope.generate` is the usual way in.
    """
    pad_id = anatomy.pad_id(model.config)
    input_ids, attention_mask = _left_pad(input_ids, attention_mask, pad_id)
    names = [] if capture is None else hook_points.resolve(capture)
    steps: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def record(x: torch.Tensor, hook: HookPoint) -> None:
        last = x[:, :, -1] if hook.pos_dim == 2 else x[:, -1]
        steps[hook.name].append(last.detach().clone())

    with torch.no_grad(), hook_points.attach(hooks), hook_points.attach({n: record for n in names}):
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id, **generate_kwargs)
    new_tokens = sequences[:, input_ids.shape[1]:]
    n_new = new_tokens.shape[1]
    activations = {}
    for name, rows in steps.items():
        rows = rows[:n_new]
        if rows and rows[0].dim() >= 2 and is_pattern(name):
            k = max(r.shape[-1] for r in rows)
            rows = [torch.nn.functional.pad(r, (0, k - r.shape[-1])) for r in rows]
            activations[name] = torch.stack(rows, dim=2)
        else:
            activations[name] = torch.stack(rows, dim=1)
    texts = None
    if tokenizer is not None:
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return GenerationResult(sequences, attention_mask, new_tokens, texts, activations)
