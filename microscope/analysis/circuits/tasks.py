"""Circuit tasks as data: clean and corrupted prompts aligned at their last token, and a metric.

The metric is the log-odds of two named token sets at each prompt's last real token, averaged
over prompts: ``logsumexp(logits[good]) - logsumexp(logits[bad])`` (a logit difference when each
set holds one token; the softmax normaliser cancels, so it is log P(good) - log P(bad)).

    task = repetition_task(scope, n_prompts=32, span=10, shown=5, seed=0)
    task = toxicity_task(scope, "toxicity", good=["fool", ...], bad=["friend", ...])
    task.metric(scope.run(task.clean, attention_mask=task.mask))      # scalar tensor
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from microscope.analysis.inputs import distinct_word_classes, end_aligned, last_positions, task_value, token_ids
from microscope.errors import AnalysisInputError
from microscope.prompts import Prompt, load_prompts


@dataclass(frozen=True)
class CircuitTask:
    """clean / corrupt: LongTensor [batch, pos] (`mask` 1 = a real token of the clean prompt);
    good / bad: LongTensor [batch, n] token ids whose log-odds is the metric (see module doc).
    corrupt_mask: the corrupted prompts' own mask when a pair differs in token length (the pair is
    then aligned at its end, left padded); None when it equals `mask`."""

    name: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    mask: torch.Tensor
    good: torch.Tensor
    bad: torch.Tensor
    corrupt_mask: torch.Tensor | None = None

    def __post_init__(self):
        shapes = {tuple(t.shape) for t in (self.clean, self.corrupt, self.mask, self.corrupt_attention_mask)}
        if len(shapes) != 1:
            raise AnalysisInputError(f"task {self.name!r}: clean {tuple(self.clean.shape)}, corrupt "
                                     f"{tuple(self.corrupt.shape)} and their masks must have one shape")

    @property
    def corrupt_attention_mask(self) -> torch.Tensor:
        return self.mask if self.corrupt_mask is None else self.corrupt_mask

    @property
    def clean_only(self) -> torch.Tensor:
        """bool [batch, pos]: positions where only the clean prompt has a token (nothing to patch in
        there: an ablated edge carries the clean value)."""
        return self.mask.bool() & ~self.corrupt_attention_mask.bool()

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def positions_read(self) -> int:
        """How many trailing positions the metric reads (each prompt's last token, wherever padding
        puts it): the ``logits_to_keep`` of every run of the task."""
        return int(self.mask.shape[1] - last_positions(self.mask).min())

    def per_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch] log-odds of good vs bad at each prompt's last token, from logits [batch, k, vocab]
        of the last k >= `positions_read` positions (all of them, or ``logits_to_keep=k``)."""
        rows = torch.arange(len(logits), device=logits.device)
        offset = self.mask.shape[1] - logits.shape[1]
        return self.log_odds(logits[rows, (last_positions(self.mask) - offset).to(logits.device)])

    def log_odds(self, last: torch.Tensor) -> torch.Tensor:
        """[batch] log-odds of good vs bad from the logits at each prompt's last token [batch, vocab]."""
        last = last.float()
        good = last.gather(1, self.good.to(last.device)).logsumexp(1)
        bad = last.gather(1, self.bad.to(last.device)).logsumexp(1)
        return good - bad

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The mean of `per_prompt` (a scalar tensor, differentiable)."""
        return self.per_prompt(logits).mean()


def repetition_task(scope, *, n_prompts: int = 32, span: int = 10, shown: int = 5, seed: int = 0,
                    words: Sequence[str] | None = None) -> CircuitTask:
    """A repeated span: ``bos a_1..a_span a_1..a_shown``, answer a_{shown+1} (by induction).

    Corruption resamples the first copy (``bos b_1..b_span a_1..a_shown``, the b's distinct from
    the a's), so nothing earlier predicts the answer; the wrong token is b_{shown+1}. Tokens are
    drawn (seeded) from `words` (one token each) or, by default, every ordinary token."""
    if not 0 < shown < span:
        raise AnalysisInputError(f"shown must lie in (0, span={span}), got {shown}")
    pool = _token_pool(scope, words)
    if len(pool) < 2 * span:
        raise AnalysisInputError(f"{len(pool)} tokens to draw from; a span of {span} needs {2 * span}")
    g = torch.Generator().manual_seed(seed)
    drawn = torch.stack([pool[torch.randperm(len(pool), generator=g)[: 2 * span]] for _ in range(n_prompts)])
    first, other = drawn[:, :span], drawn[:, span:]
    bos = torch.full((n_prompts, 1), scope.config.bos_token_id)
    clean = torch.cat([bos, first, first[:, :shown]], 1)
    corrupt = torch.cat([bos, other, first[:, :shown]], 1)
    return CircuitTask("repetition", clean, corrupt, torch.ones_like(clean), first[:, shown:shown + 1],
                       other[:, shown:shown + 1])


def _token_pool(scope, words: Sequence[str] | None) -> torch.Tensor:
    """LongTensor of candidate tokens: the ids of `words`, or every id that is not special."""
    if words is not None:
        return token_ids(scope, list(words), len(words))
    special = set(scope.tokenizer.all_special_ids) | {scope.config.pad_token_id, scope.config.bos_token_id}
    n_vocab = min(len(scope.tokenizer), scope.config.vocab_size)
    return torch.tensor([t for t in range(n_vocab) if t not in special])


def toxicity_task(scope, prompts: Sequence[Prompt] | str = "toxicity", *, good: Sequence[str] | None = None,
                  bad: Sequence[str] | None = None, clean_label: str = "hostile",
                  corrupt_label: str = "friendly") -> CircuitTask:
    """Paired prompts (metadata ``pair`` and ``label``): clean = the `clean_label` prompt of each
    pair, corrupt = its `corrupt_label` partner (`end_aligned`: any token lengths); metric: log-odds of the
    `good` words (default: the set's task ``"insults"``) against the `bad` ones (``"praises"``),
    each word by its first token (`inputs.word_class_ids`)."""
    good = task_value(prompts, "insults", good, parameter="good")
    bad = task_value(prompts, "praises", bad, parameter="bad")
    source, prompts = prompts, load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    pairs: dict = {}
    for p in prompts:
        pairs.setdefault(p.metadata.get("pair"), {})[p.metadata.get("label")] = p.text
    pairs = {k: v for k, v in pairs.items() if k is not None and clean_label in v and corrupt_label in v}
    if not pairs:
        raise AnalysisInputError(f"no prompt pair has both labels {clean_label!r} and {corrupt_label!r}")
    clean, mask, corrupt, corrupt_mask = end_aligned(scope, [v[clean_label] for v in pairs.values()],
                                                     [v[corrupt_label] for v in pairs.values()])
    n = len(clean)
    classes = distinct_word_classes(scope, {"good": good, "bad": bad}, source)
    good_ids, bad_ids = (classes[name].expand(n, -1) for name in ("good", "bad"))
    return CircuitTask("toxicity", clean, corrupt, mask, good_ids, bad_ids,
                       None if torch.equal(mask, corrupt_mask) else corrupt_mask)
