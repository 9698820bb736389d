"""How good a dictionary is: reconstruction over a store (one streaming pass) and the
cross-entropy loss recovered when it is spliced into the model.

    reconstruction_metrics(d, store)   # {"fvu", "l0", "dead_share", "dense_share", "tokens"}
    ce_loss_recovered(scope, d, prompts)
    # {"ce_clean", "ce_zero_ablated", "ce_mean_ablated", "ce_spliced", "ce_loss_recovered",
    #  "ce_loss_recovered_vs_mean"}

FVU = sum |y - y_hat|^2 / sum |y - mean(y)|^2 over every token of the store (mean over the store).
Dead: a latent that never fires on the store; dense: one that fires on more than `dense_above` of
its tokens. CE loss recovered = (CE zero-ablated - CE spliced) / (CE zero-ablated - CE clean):
1 when splicing costs nothing, 0 when it is as bad as erasing the activation. Zeroing a whole
residual stream is so destructive that a poor dictionary still scores high on it (on the organism's
blocks.1.hook_resid_post an untrained 8x dictionary recovers 0.88 of it, but 0.67 against mean
ablation), so the same ratio against mean ablation (every token's activation replaced by the mean
over the prompts' tokens) is reported beside it as the stricter measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from microscope.analysis.features.coder import Dictionary
from microscope.analysis.features.splice import splice_hooks


@torch.no_grad()
def reconstruction_metrics(d: Dictionary, store, *, batch_size: int = 4096, dense_above: float = 0.1) -> dict:
    """FVU, mean L0, dead and dense latent shares of `d` over every token of `store`."""
    names = list(dict.fromkeys([d.hook, d.target]))
    n, l0, err = 0, 0.0, 0.0
    sum_y = sum_y2 = None
    counts = torch.zeros(d.n_latents, dtype=torch.float64)
    for batch in store.batches(names, batch_size, shuffle=False):
        x, y = batch[d.hook].float(), batch[d.target].float()
        acts, idx, _ = d.coder.encode(x)
        y_hat = d.coder.decode(acts, idx)
        active = acts > 0
        counts.index_add_(0, idx[active], torch.ones(int(active.sum()), dtype=torch.float64))
        l0 += float(active.sum())
        err += float((y - y_hat).double().pow(2).sum())
        s, s2 = y.double().sum(0), y.double().pow(2).sum(0)
        sum_y, sum_y2 = (s, s2) if sum_y is None else (sum_y + s, sum_y2 + s2)
        n += len(x)
    total_variance = float((sum_y2 - sum_y ** 2 / n).sum())
    density = counts / n
    return {"fvu": err / total_variance, "l0": l0 / n, "dead_share": float((counts == 0).double().mean()),
            "dense_share": float((density > dense_above).double().mean()), "tokens": n}


@torch.no_grad()
def ce_loss_recovered(scope, d: Dictionary, prompts: Sequence[str], *, batch_size: int = 64) -> dict:
    """Mean next-token cross-entropy (nats) clean, with `d.target` zeroed, with it mean-ablated, and
    with `d` spliced in; the loss recovered against zero and against mean ablation."""
    batches = [scope.tokenize(list(prompts[i:i + batch_size])) for i in range(0, len(prompts), batch_size)]
    total, count = 0.0, 0
    for ids, mask in batches:
        _, cache = scope.run_with_cache(ids, names=[d.target], attention_mask=mask, positions=mask.bool())
        total, count = total + cache[d.target].double().sum(0), count + len(cache[d.target])
    mean = (total / count).float()
    losses = {"ce_clean": None, "ce_zero_ablated": {d.target: lambda x, hook: torch.zeros_like(x)},
              "ce_mean_ablated": {d.target: lambda x, hook: mean.to(x).expand_as(x)},
              "ce_spliced": splice_hooks(d)}
    totals = dict.fromkeys(losses, 0.0)
    count = 0
    for ids, mask in batches:
        ids, mask = ids.to(scope.device), mask.to(scope.device)
        keep = mask[:, 1:].bool()
        count += int(keep.sum())
        for key, hooks in losses.items():
            logits = scope.run(ids, attention_mask=mask, hooks=hooks).float()
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            totals[key] += float(ce[keep].sum())
    out = {k: v / count for k, v in totals.items()}
    for name, base in (("ce_loss_recovered", "ce_zero_ablated"), ("ce_loss_recovered_vs_mean", "ce_mean_ablated")):
        gap = out[base] - out["ce_clean"]
        out[name] = (out[base] - out["ce_spliced"]) / gap if gap else float("nan")
    return out
