"""EAP and EAP-IG time against one plain forward on an OPT-125m-shaped model; with --organism,
the two EAP-IG paths against exact patching of every edge on the organism's repetition task.

    python benchmarks/circuits.py [--runs 3] [--batch 8] [--tokens 128] [--steps 5]
    python benchmarks/circuits.py --organism [--runs 3] [--steps 5]

random:opt-125m (fp32, CPU), clean and corrupted batches of random token ids (the corrupted one
differs in the first half); per round: the plain HF forward of the clean batch, EAP
(`eap_scores(steps=1)`: a corrupted forward recording the senders, a clean forward and one
backward, the receivers' gradients pulled back through their LayerNorms, the edge scores) and
EAP-IG (`steps` - 1 more forwards and backwards, on interpolated embeddings); median over rounds
after a warm-up round. Goal (issue 14): EAP within 4x a forward, EAP-IG within 4x + 1x per step.

--organism: the repetition task as its spec builds it (32 prompts), per round a plain forward,
exact patching of all 479 edges, EAP-IG on the inputs' path and EAP-IG on the receivers' path
(`steps` points per receiver); the receivers' path is too slow to time on opt-125m here (445
receivers x `steps` forwards and backwards of the batch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import microscope
from microscope.analysis.circuits.eap import eap_scores
from microscope.analysis.circuits.edge_patching import exact_edge_effects
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.tasks import CircuitTask, repetition_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--organism", action="store_true", help="the organism's repetition task instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.organism:
        scope = microscope.load("organism")
        task = repetition_task(scope)
    else:
        scope = microscope.load("random:opt-125m")
        g = torch.Generator().manual_seed(0)
        clean = torch.randint(3, 50000, (args.batch, args.tokens), generator=g)
        corrupt = clean.clone()
        corrupt[:, : args.tokens // 2] = torch.randint(3, 50000, (args.batch, args.tokens // 2), generator=g)
        task = CircuitTask("benchmark", clean, corrupt, torch.ones_like(clean), torch.full((args.batch, 1), 5),
                           torch.full((args.batch, 1), 7))
    graph = CircuitGraph.of(scope.model)

    def forward():
        with torch.no_grad():
            scope.run(task.clean, attention_mask=task.mask)

    def eap_ig(interpolate: str = "inputs"):
        return lambda: eap_scores(scope, graph, task, steps=args.steps, interpolate=interpolate)

    if args.organism:
        variants = {"forward": forward, "exact patching": lambda: exact_edge_effects(scope, graph, task),
                    f"EAP-IG inputs ({args.steps})": eap_ig(), f"EAP-IG receivers ({args.steps})": eap_ig("receivers")}
    else:
        variants = {"forward": forward, "EAP": lambda: eap_scores(scope, graph, task, steps=1),
                    f"EAP-IG ({args.steps} steps)": eap_ig()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.runs + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["forward"])
    print(f"{'organism' if args.organism else 'random:opt-125m'}, {len(task)} x {task.clean.shape[1]} tokens, "
          f"{graph.n_edges} edges, {graph.n_receivers} receivers, {torch.get_num_threads()} threads, "
          f"median of {args.runs}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>24}: {median:8.3f} s  {median / base:8.2f}x forward")
    if not args.organism:
        print(f"goal: EAP <= 4x, EAP-IG <= {4 + args.steps}x")


if __name__ == "__main__":
    main()
