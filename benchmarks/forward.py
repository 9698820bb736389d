"""Capture overhead on an OPT-125m-shaped model: our hooks vs plain HF, TransformerLens and nnsight.

    python benchmarks/forward.py [--runs 7] [--batch 8] [--tokens 128]

random:opt-125m (fp32, CPU), one batch of random token ids, every variant timed once per round
(rounds interleave the variants so machine load hits them alike), median over rounds, after one
warm-up round. Ratios are against the plain HF forward (sdpa) of the same round set.
TransformerLens gets its own copy of the weights: its bridge switches the model it wraps to eager
attention, which would otherwise slow our sdpa variants down too.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import nnsight
import torch

import microscope
from microscope.interop import to_nnsight, to_transformer_lens
from microscope.scope import Scope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    scope = microscope.load("random:opt-125m")
    model = scope.model.eval()
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(4, 50000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    resid_names = [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]

    tl_scope = Scope(copy.deepcopy(model), scope.tokenizer, source="random:opt-125m (copy for TL)")
    bridge = to_transformer_lens(tl_scope)
    lm = to_nnsight(scope)
    layers = lm.model.decoder.layers

    def plain_sdpa():
        model(input_ids=ids, attention_mask=mask)

    def plain_eager():
        tl_scope.model(input_ids=ids, attention_mask=mask)     # the TL copy is eager now

    def ours_resid():
        scope.run_with_cache(ids, names="blocks.*.hook_resid_post")

    def ours_all():
        scope.run_with_cache(ids)

    def tl_resid():
        bridge.run_with_cache(ids, names_filter=resid_names)

    def tl_all():
        bridge.run_with_cache(ids)

    def nnsight_resid():
        with lm.trace(ids):
            saved = nnsight.save([])
            for l in range(n_layers):
                saved.append(layers[l].output)

    variants = {
        "HF forward, sdpa (baseline)": plain_sdpa,
        "HF forward, eager": plain_eager,
        "microscope run_with_cache, 12 resid_post": ours_resid,
        "microscope run_with_cache, every hook (148)": ours_all,
        "TransformerLens run_with_cache, 12 resid_post": tl_resid,
        "TransformerLens run_with_cache, every hook": tl_all,
        "nnsight trace saving 12 layer outputs": nnsight_resid,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        for round_ in range(args.runs + 1):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                if round_:                                          # round 0 is the warm-up
                    times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]

    base = statistics.median(times["HF forward, sdpa (baseline)"])
    print(f"random:opt-125m fp32 CPU, batch {args.batch} x {args.tokens} tokens, median of {args.runs} "
          f"interleaved rounds, torch threads {torch.get_num_threads()}, "
          f"load average {load_before:.1f} -> {load_after:.1f}\n")
    print("| variant | median s | min s | vs HF sdpa |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
