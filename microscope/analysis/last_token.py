"""Interventions at each prompt's last token, the rest of the prompt computed once.

An intervention that writes only at each prompt's last real token cannot change any earlier
position (attention is causal), so the keys and values of the prefix are the same in every such
run. `LastToken` runs the prefix once (HF's key/value cache) and each intervention as a step of one
position on that cache, cropped back after it. The logits equal a full forward's to float rounding
(tests/test_last_token.py); on an 18-token prompt a step computes one position where the full
forward computes 18.

Prompts are right padded (`inputs.token_batch`): the prefix run masks each prompt's last real
token, and the step feeds that token with the prefix's mask; OPT takes positions from the mask's
running count, so the token keeps its position.
"""

from __future__ import annotations

import inspect

import torch

from microscope.analysis.inputs import last_positions


class LastToken:
    """The prompts ``ids``/``mask`` [batch, pos] with their prefixes cached: `logits(hooks)` runs
    only each prompt's last real token. In the hooks, that token is position 0 (`position`)."""

    position = 0

    @torch.no_grad()
    def __init__(self, scope, ids: torch.Tensor, mask: torch.Tensor):
        self.scope = scope
        rows, last = torch.arange(len(ids)), last_positions(mask)
        prefix_mask = mask.clone()
        prefix_mask[rows, last] = 0
        device = scope.device
        # later transformers 5 releases renamed `past_key_values` to `cache` (the old name warns)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(scope.model.forward).parameters \
            else "past_key_values"
        out = scope.model(input_ids=ids.to(device), attention_mask=prefix_mask.to(device), use_cache=True,
                          logits_to_keep=1)
        self.cache = getattr(out, self._cache_kwarg)
        self.width = ids.shape[1]
        self.token = ids[rows, last][:, None].to(device)
        self.mask = torch.cat([prefix_mask, torch.ones_like(prefix_mask[:, :1])], 1).to(device)

    @torch.no_grad()
    def logits(self, hooks: dict | None = None) -> torch.Tensor:
        """Logits [batch, vocab] at each prompt's last real token with ``hooks`` in force (they see
        one position)."""
        try:
            with self.scope.hooks(hooks):
                return self.scope.model(input_ids=self.token, attention_mask=self.mask, use_cache=True,
                                        **{self._cache_kwarg: self.cache}).logits[:, -1]
        finally:
            excess = self.cache.get_seq_length() - self.width
            if excess:
                self.cache.crop(-excess)
