"""Runtime of each failure-mode study with its default controls (CPU).

    python benchmarks/study_runtime.py                           # the organism, median of 3 runs
    python benchmarks/study_runtime.py --model random:opt-125m --repeats 1
    python benchmarks/study_runtime.py --threads 1               # pin torch's thread count (a busy machine)
    python benchmarks/study_runtime.py --study toxicity --study repetition --repeats 1

Each study runs with its defaults, controls included (5 random-init models, random heads,
shuffled labels, random directions, a tuned lens fitted in the run), on the built-in English
prompt sets. Targets: 60 s on the organism, 10 minutes on an opt-125m-shaped checkpoint (the
issue a researcher would wait on). Each study's progress goes to stderr, one line per step.

Baseline, measured in the same run: one greedy generation of 64 tokens for the whole built-in
``repetition`` set, the single most common step of the studies; each study's time is also given
as a multiple of it, so runs on differently loaded machines can be compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import microscope as ms
from microscope.analysis.studies import STUDIES
from microscope.analysis.studies.base import greedy_new_tokens
from microscope.prompts import load_prompts


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def log_progress(step: str, done: int, total: int) -> None:
    print(f"  {step}: {done}/{total}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism", help="any microscope.load source (random:opt-125m)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--study", action="append", choices=sorted(STUDIES), default=None,
                        help="run only these studies (repeat the flag; default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scope = ms.load(args.model)
    target = 60 if args.model == "organism" else 600
    texts = [p.text for p in load_prompts("repetition")]
    base = median_seconds(lambda: greedy_new_tokens(scope, texts, 64), args.repeats)
    print(f"{args.model}; torch threads {torch.get_num_threads()}; baseline (greedy {len(texts)} x 64 tokens): "
          f"{base:.2f} s", flush=True)
    print("| study | median s | x baseline | target |")
    print("|---|---|---|---|", flush=True)
    for name, run in STUDIES.items():
        if args.study and name not in args.study:
            continue
        seconds = median_seconds(lambda run=run: run(scope, progress=log_progress), args.repeats)
        verdict = "met" if seconds < target else "MISSED"
        print(f"| {name} | {seconds:.2f} | {seconds / base:.1f} | < {target} s: {verdict} |", flush=True)


if __name__ == "__main__":
    main()
