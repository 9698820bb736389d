"""The study lens against longer tuned-lens fits: held-out KL to the output at every lens point, and
the time of each fit (CPU).

    python benchmarks/lens_fit.py                      # organism v3 and its post-LN sibling
    python benchmarks/lens_fit.py --model random:opt-125m --recipe study --recipe logit

Each recipe fits on the model's own samples (`studies.layers.model_samples`, 64 x 48 tokens, as
the studies do) and is read on held-out prompts (a third of the built-in instructions, arithmetic
and toxicity sets): mean KL(output || lens) in nats per token, per point. Recipes:

- ``logit``: no translators (the logit lens);
- ``start``: the closed-form least-squares start alone (`tuned_lens.least_squares_start`);
- ``study``: the start, then 20 Adam steps of 64 rows at lr 3e-3 (`studies.layers.fit_study_lens`);
- ``identity_20``: the same 20 steps from the identity (the plain tuned-lens start);
- ``identity_100``: 100 steps of 256 rows at lr 1e-2 from the identity (the studies' lens before).

Median time over --runs fits (the sampling not included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import microscope as ms
from microscope.analysis.lens import residual_points
from microscope.analysis.studies.layers import model_samples
from microscope.analysis.tuned_lens import TunedLens, compare_lenses, fit_tuned_lens
from microscope.prompts import load_prompts

RECIPES = {
    "logit": None,
    "start": dict(steps=0),
    "study": dict(steps=20, batch_tokens=64, lr=3e-3),
    "identity_20": dict(steps=20, batch_tokens=64, lr=3e-3, init="identity"),
    "identity_100": dict(steps=100, batch_tokens=256, lr=1e-2, init="identity"),
}


def fit(scope, samples: torch.Tensor, recipe: dict | None) -> TunedLens:
    if recipe is None:
        return TunedLens(residual_points(scope), scope.model.config.hidden_size)
    with torch.enable_grad():
        return fit_tuned_lens(scope, samples, **recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="microscope.load sources (repeat)")
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    held_out = [p.text for name in ("instructions", "arithmetic", "toxicity") for p in load_prompts(name)][::3]
    for source in args.model or ["organism", "organism-v3-sibling"]:
        scope = ms.load(source)
        samples = model_samples(scope)
        labels = ["embed"] + [f"L{i}" for i in range(scope.model.config.num_hidden_layers - 1)]
        print(f"\n{source}; torch threads {torch.get_num_threads()}; KL(output || lens), nats per token, "
              f"{len(held_out)} held-out prompts")
        print("| recipe | " + " | ".join(labels) + " | fit s (median) |")
        print("|---" * (len(labels) + 2) + "|")
        for name in args.recipe or list(RECIPES):
            times, lens = [], None
            for _ in range(args.runs if RECIPES[name] is not None else 1):
                start = time.perf_counter()
                lens = fit(scope, samples, RECIPES[name])
                times.append(time.perf_counter() - start)
            kl = compare_lenses(scope, held_out, lens).tuned_kl[:-1]
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in kl.tolist())
                  + f" | {statistics.median(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
