"""Dictionary training fed from a store against the same training fed from memory, and the feed's
memory as the store grows (median of --runs runs, same process, one thread).

(a) The organism's blocks.1.hook_resid_post on the demo prompts repeated to --tokens tokens
    (fp16, the dump's default chunks): `train_step` of a 128 -> 1024, k = 16 TopK SAE on batches of 512
    from `StoreFeed` (shuffled store batches) vs from the same rows already in memory as one float32
    tensor (a random permutation per epoch). Target: the store feed at >= 0.8x.
(b) Peak resident memory growth during one full pass of the store's shuffled batches over two
    stores of --tokens and 10 x --tokens tokens in chunks of 1024 rows (so both hold more chunks
    than the shuffle buffer's 8), each pass in a fresh process (peak RSS during the pass, sampled
    every 2 ms, minus the RSS before it): bounded means about equal.

    python benchmarks/features.py [--runs 3] [--tokens 20000] [--steps 60]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import microscope
from microscope.activations.distributed import Ranks
from microscope.activations.dump import dump
from microscope.analysis.features.coder import new_coder
from microscope.analysis.features.feed import StoreFeed
from microscope.analysis.features.train import TrainSettings, train_step
from microscope.prompts import load_prompts

HOOK = "blocks.1.hook_resid_post"
BATCH = 512


def make_store(scope, tokens: int, path: Path, chunk_rows: int | None = None):
    prompts = load_prompts("demo")
    per_round = sum(len(p.text.split()) + 1 for p in prompts)
    dump(scope, prompts * max(1, tokens // per_round), HOOK, str(path), chunk_rows=chunk_rows)
    return microscope.open_store(str(path))


def train_tokens_per_s(batches, steps: int) -> float:
    """tokens/s of `steps` training steps on the (x, y) pairs `batches` yields (after one warm-up step)."""
    settings = TrainSettings(dead_tokens=20_000)
    coder = new_coder(128, n_latents=1024, k=16)
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"step": 0, "since_fired": torch.zeros(1024, dtype=torch.long)}
    source = iter(batches)
    x, y = next(source)
    train_step(coder, optimizer, schedule, x, y, state, settings, Ranks())
    state["step"] = 1
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(source)
        train_step(coder, optimizer, schedule, x, y, state, settings, Ranks())
        state["step"] += 1
    return steps * BATCH / (time.perf_counter() - start)


def memory_batches(rows: torch.Tensor):
    """Endless shuffled batches of in-memory rows (a new permutation each epoch)."""
    g = torch.Generator().manual_seed(0)
    while True:
        order = torch.randperm(len(rows), generator=g)
        for i in range(0, len(rows) - BATCH + 1, BATCH):
            batch = rows[order[i:i + BATCH]]
            yield batch, batch


def pass_growth_mb(path: Path) -> float:
    """RSS growth (MB) of one pass of shuffled batches over the store at `path`, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--one-pass", str(path)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def one_pass(path: str) -> None:
    """Print the peak RSS above the RSS before one pass over the store (sampled every 2 ms), in MB."""
    import psutil

    store = microscope.open_store(path)
    process, peak, done = psutil.Process(), [0], threading.Event()
    next(iter(store.batches(HOOK, BATCH, seed=1)))             # warm up zarr's loop and codecs
    before = process.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    watcher = threading.Thread(target=sample)
    watcher.start()
    sum(len(b) for b in store.batches(HOOK, BATCH, seed=0))
    done.set()
    watcher.join()
    print(max(0, peak[0] - before) / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--one-pass", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one_pass:
        return one_pass(args.one_pass)
    scope = microscope.load("organism")
    tmp = Path(tempfile.mkdtemp(prefix="features-bench-"))
    try:
        small = make_store(scope, args.tokens, tmp / "train.zarr")
        rows = torch.from_numpy(small[HOOK][:]).float()
        feed = StoreFeed(small, HOOK, BATCH)
        store_rates, memory_rates = [], []
        for _ in range(args.runs):
            store_rates.append(train_tokens_per_s((b for _, b in feed.steps(0)), args.steps))
            memory_rates.append(train_tokens_per_s(memory_batches(rows), args.steps))
        s, m = statistics.median(store_rates), statistics.median(memory_rates)
        print(f"(a) {small.n_tokens:,} tokens, {args.steps} steps of {BATCH}: store feed {s:,.0f} tok/s, "
              f"in memory {m:,.0f} tok/s, ratio {s / m:.2f}x (target >= 0.8x)")
        for name, tokens in (("small", args.tokens), ("large", 10 * args.tokens)):
            store = make_store(scope, tokens, tmp / f"{name}.zarr", chunk_rows=1024)
            mb = statistics.median(pass_growth_mb(tmp / f"{name}.zarr") for _ in range(args.runs))
            print(f"(b) {name}: {store.n_tokens:,} tokens ({store.n_tokens * 128 * 2 / 1e6:.1f} MB fp16, "
                  f"{len(store.units)} chunks): RSS growth over one pass {mb:.1f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
