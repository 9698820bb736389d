"""Circuit tasks as data: clean and corrupted prompts of equal length and a metric.

The metric is the log-odds of two named token sets at each prompt's last real token, averaged
over prompts: ``logsumexp(logits[good]) - logsumexp(logits[bad])`` (a logit difference when each
set holds one token; the softmax normaliser cancels, so it is log P(good) - log P(bad)).

    task = repetition_task(scope, n_prompts=32, span=8, seed=0)
    task = toxicity_task(scope, "toxicity", good=["fool", ...], bad=["friend", ...])
    task.metric(scope.run(task.clean, attention_mask=task.mask))      # scalar tensor
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from microscope.analysis.head_scores import repeated_random_tokens
from microscope.analysis.inputs import last_positions, token_batch, token_ids
from microscope.errors import AnalysisInputError
from microscope.prompts import Prompt, load_prompts


@dataclass(frozen=True)
class CircuitTask:
    """clean / corrupt: LongTensor [batch, pos] (same padding, `mask` 1 = real token);
    good / bad: LongTensor [batch, n] token ids whose log-odds is the metric (see module doc)."""

    name: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    mask: torch.Tensor
    good: torch.Tensor
    bad: torch.Tensor

    def __post_init__(self):
        if self.clean.shape != self.corrupt.shape or self.clean.shape != self.mask.shape:
            raise AnalysisInputError(f"task {self.name!r}: clean {tuple(self.clean.shape)}, corrupt "
                                     f"{tuple(self.corrupt.shape)} and mask must have one shape")

    def __len__(self) -> int:
        return len(self.clean)

    def per_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch] log-odds of good vs bad at each prompt's last token, from logits [batch, pos, vocab]."""
        rows = torch.arange(len(logits), device=logits.device)
        last = logits[rows, last_positions(self.mask).to(logits.device)].float()      # [batch, vocab]
        good = last.gather(1, self.good.to(logits.device)).logsumexp(1)
        bad = last.gather(1, self.bad.to(logits.device)).logsumexp(1)
        return good - bad

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The mean of `per_prompt` (a scalar tensor, differentiable)."""
        return self.per_prompt(logits).mean()


def repetition_task(scope, *, n_prompts: int = 32, span: int = 8, shown: int = 4, seed: int = 0) -> CircuitTask:
    """A repeated span: ``bos a_1..a_span a_1..a_shown``, answer a_{shown+1} (by induction).

    Corruption resamples the first copy (``bos b_1..b_span a_1..a_shown``), so nothing earlier
    predicts the answer; the wrong token is b_{shown+1}. Spans are random ordinary tokens of the
    whole vocabulary (`head_scores.repeated_random_tokens`, seeds `seed` and `seed + 1`)."""
    if not 0 < shown < span:
        raise AnalysisInputError(f"shown must lie in (0, span={span}), got {shown}")
    clean = repeated_random_tokens(scope, n_prompts=n_prompts, span=span, seed=seed)[:, : 1 + span + shown]
    other = repeated_random_tokens(scope, n_prompts=n_prompts, span=span, seed=seed + 1)
    corrupt = torch.cat([clean[:, :1], other[:, 1: 1 + span], clean[:, 1 + span:]], 1)
    good, bad = clean[:, shown + 1: shown + 2], other[:, shown + 1: shown + 2]
    keep = good[:, 0] != bad[:, 0]
    return CircuitTask("repetition", clean[keep], corrupt[keep], torch.ones_like(clean[keep]), good[keep], bad[keep])


def toxicity_task(scope, prompts: Sequence[Prompt] | str = "toxicity", *, good: Sequence[str],
                  bad: Sequence[str], clean_label: str = "hostile", corrupt_label: str = "friendly") -> CircuitTask:
    """Paired prompts (metadata ``pair`` and ``label``): clean = the `clean_label` prompt of each
    pair, corrupt = its `corrupt_label` partner (equal token length); metric: log-odds of the
    `good` words (e.g. insults) against the `bad` ones (e.g. praise)."""
    prompts = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    pairs: dict = {}
    for p in prompts:
        pairs.setdefault(p.metadata.get("pair"), {})[p.metadata.get("label")] = p.text
    pairs = {k: v for k, v in pairs.items() if k is not None and clean_label in v and corrupt_label in v}
    if not pairs:
        raise AnalysisInputError(f"no prompt pair has both labels {clean_label!r} and {corrupt_label!r}")
    clean, mask = token_batch(scope, [v[clean_label] for v in pairs.values()])
    corrupt, corrupt_mask = token_batch(scope, [v[corrupt_label] for v in pairs.values()])
    if not torch.equal(mask, corrupt_mask):
        raise AnalysisInputError("a clean prompt and its corrupted partner differ in token length")
    n = len(clean)
    good_ids = torch.stack([token_ids(scope, list(good), len(good))] * n)
    bad_ids = torch.stack([token_ids(scope, list(bad), len(bad))] * n)
    return CircuitTask("toxicity", clean, corrupt, mask, good_ids, bad_ids)
