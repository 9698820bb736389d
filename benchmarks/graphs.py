"""One attribution graph for a 32-token prompt, timed against one forward pass, with its peak memory.

    python benchmarks/graphs.py [--model organism] [--runs 3] [--tokens 32]
    python benchmarks/graphs.py --model random:opt-125m --latents 4096 --k 32     # the opt-125m shape

For each model: the median over --runs of (1) one plain HF forward of the prompt (the baseline,
same process, same thread count), (2) building the replacement model (one hooked forward with
every pattern captured, each transcoder's latents), (3) `attribute` (every row of the adjacency
by batched backward passes), (4) `prune` and `graph_scores`; the graph's size; and the peak
memory above the level before the graph was built: resident memory sampled every 2 ms on the CPU
(psutil), `torch.cuda.max_memory_allocated` on a GPU. The transcoders have --latents latents and
TopK --k, with random weights (the cost depends on their shapes and on k, which fixes the number
of active features: layers x tokens x k, not on training). The prompt is the first --tokens
tokens of the demo prompts joined.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

import microscope
from microscope.analysis.features.coder import Dictionary, new_coder
from microscope.analysis.graphs import ReplacementModel, attribute, graph_scores, prune
from microscope.analysis.graphs.transcoders import Transcoders, mlp_hooks
from microscope.prompts import load_prompts


def random_transcoders(config, n_latents: int, k: int) -> Transcoders:
    """Transcoders of the model's shape with random encoders, decoders and biases."""
    out = []
    for layer in range(config.num_hidden_layers):
        coder = new_coder(config.hidden_size, n_latents=n_latents, k=k, transcode=True, seed=layer)
        with torch.no_grad():
            coder.W_dec.normal_(0, config.hidden_size ** -0.5)
            coder.encoder.bias.normal_(0, 0.1)
        out.append(Dictionary(coder.eval(), *mlp_hooks(layer)))
    return Transcoders(out)


class PeakMemory:
    """Peak memory (MB) above the level at entry: CUDA allocations on a GPU, else resident memory."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self.process, self.done = psutil.Process(), threading.Event()
        self.before, self.top = self.process.memory_info().rss, self.process.memory_info().rss

        def sample():
            while not self.done.is_set():
                self.top = max(self.top, self.process.memory_info().rss)
                time.sleep(0.002)

        self.watcher = threading.Thread(target=sample)
        self.watcher.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = (torch.cuda.max_memory_allocated(self.device) - self.before) / 1e6
        else:
            self.done.set()
            self.watcher.join()
            self.peak = max(0, self.top - self.before) / 1e6


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench(source: str, runs: int, tokens: int, latents: int | None, k: int, batch_size: int,
          device: str | None) -> None:
    scope = microscope.load(source, device=device)
    text = " ".join(p.text for p in list(load_prompts("demo"))[:8])
    ids = scope.tokenize([text], truncation=True, max_length=tokens)[0][0]
    latents = latents or 8 * scope.config.hidden_size
    tcs = random_transcoders(scope.config, latents, k)
    where = scope.device
    rows = {"forward": [], "replacement": [], "attribute": [], "prune": [], "peak": []}
    for _ in range(runs):
        with torch.no_grad():
            rows["forward"].append(timed(lambda: scope.model(ids[None].to(where)))[1])
        with PeakMemory(where) as memory:
            rm, seconds = timed(lambda: ReplacementModel(scope, tcs, ids))
            rows["replacement"].append(seconds)
            graph, seconds = timed(lambda: attribute(rm, max_n_logits=10, batch_size=batch_size))
            rows["attribute"].append(seconds)
            (_, scores), seconds = timed(lambda: (prune(graph), graph_scores(graph)))
            rows["prune"].append(seconds)
        rows["peak"].append(memory.peak)
        n_features = graph.n_features
        del rm, graph
    median = {key: statistics.median(values) for key, values in rows.items()}
    total = median["replacement"] + median["attribute"] + median["prune"]
    print(f"{source}: {len(ids)} tokens, {scope.config.num_hidden_layers} layers, transcoders {latents} latents "
          f"k={k}, {n_features} active features, on {where}, "
          f"threads {torch.get_num_threads()}")
    print(f"  forward {median['forward'] * 1e3:.1f} ms | replacement {median['replacement']:.3f} s | attribute "
          f"{median['attribute']:.3f} s | prune + scores {median['prune']:.3f} s | graph {total:.2f} s = "
          f"{total / median['forward']:.0f} forwards | peak memory {median['peak']:.0f} MB | "
          f"replacement {scores[0]:.3f}, completeness {scores[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="organism", help="organism, random:opt-125m or any load source")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--latents", type=int, default=None, help="default: 8 x d_model (organism 1024)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="targets per backward pass")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench(args.model, args.runs, args.tokens, args.latents, args.k, args.batch_size, args.device)


if __name__ == "__main__":
    main()
