"""EAP and EAP-IG time against one plain forward on an OPT-125m-shaped model.

    python benchmarks/circuits.py [--runs 3] [--batch 8] [--tokens 128] [--steps 5]

random:opt-125m (fp32, CPU), clean and corrupted batches of random token ids (the corrupted one
differs in the first half); per round: the plain HF forward of the clean batch, EAP
(`eap_scores(steps=1)`: a corrupted forward recording the senders, a clean forward and one
backward, the receivers' gradients pulled back through their LayerNorms, the edge scores) and
EAP-IG (`steps` - 1 more forwards and backwards, on interpolated embeddings); median over rounds
after a warm-up round. Goal (issue 14): EAP within 4x a forward, EAP-IG within 4x + 1x per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import microscope
from microscope.analysis.circuits.eap import eap_scores
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.tasks import CircuitTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scope = microscope.load("random:opt-125m")
    graph = CircuitGraph.of(scope.model)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 50000, (args.batch, args.tokens), generator=g)
    corrupt = clean.clone()
    corrupt[:, : args.tokens // 2] = torch.randint(3, 50000, (args.batch, args.tokens // 2), generator=g)
    task = CircuitTask("benchmark", clean, corrupt, torch.ones_like(clean), torch.full((args.batch, 1), 5),
                       torch.full((args.batch, 1), 7))

    def forward():
        with torch.no_grad():
            scope.run(clean)

    variants = {"forward": forward, "EAP": lambda: eap_scores(scope, graph, task, steps=1),
                f"EAP-IG ({args.steps} steps)": lambda: eap_scores(scope, graph, task, steps=args.steps)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.runs + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["forward"])
    print(f"random:opt-125m, {args.batch} x {args.tokens} tokens, {graph.n_edges} edges, "
          f"{torch.get_num_threads()} threads, median of {args.runs}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>20}: {median:8.3f} s  {median / base:6.2f}x forward")
    print(f"goal: EAP <= 4x, EAP-IG <= {4 + args.steps}x")


if __name__ == "__main__":
    main()
