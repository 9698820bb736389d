"""Runtime of each failure-mode study on the organism (CPU): the issue's target is < 60 s per study.

    python benchmarks/study_runtime.py                 # median of 3 runs per study
    python benchmarks/study_runtime.py --threads 1     # pin torch's thread count (a busy machine)
    python benchmarks/study_runtime.py --study toxicity --study repetition --repeats 1

Each study runs with its defaults, controls included (random-init models, random heads, shuffled
labels, random directions, a tuned lens fitted in the run).

Baseline, measured in the same run: one greedy generation of 64 tokens for the whole built-in
``repetition`` set (128 prompts), the single most common step of the studies; each study's time is
also given as a multiple of it, so runs on differently loaded machines can be compared.
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--study", action="append", choices=sorted(STUDIES), default=None,
                        help="run only these studies (repeat the flag; default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scope = ms.load("organism")
    texts = [p.text for p in load_prompts("repetition")]
    base = median_seconds(lambda: greedy_new_tokens(scope, texts, 64), args.repeats)
    print(f"torch threads {torch.get_num_threads()}; baseline (greedy {len(texts)} x 64 tokens): {base:.2f} s")
    print("| study | median s | x baseline | target |")
    print("|---|---|---|---|")
    for name, run in STUDIES.items():
        if args.study and name not in args.study:
            continue
        seconds = median_seconds(lambda run=run: run(scope), args.repeats)
        print(f"| {name} | {seconds:.2f} | {seconds / base:.1f} | < 60 s: {'met' if seconds < 60 else 'MISSED'} |")


if __name__ == "__main__":
    main()
