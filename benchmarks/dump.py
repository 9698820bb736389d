"""Dump throughput against baselines measured in the same run (median of --runs runs).

(a) random:opt-125m, every blocks.*.hook_resid_post, fp16, CPU: dump tokens/s vs the plain
    forward's tokens/s over the same batches (target >= 0.9x).
(b) write-bound: a tiny OPT (8 layers, d_model 64, one head, ffn_dim 16, 64-token prompts, the
    dump's default 4096-token batches: among the shapes with the least compute per stored byte),
    every resid_pre/resid_mid/resid_post/attn_out/mlp_out hook (40), fp16: dump MB/s vs raw
    `np.save` of the same bytes (target >= 0.5x; np.save with fsync reported too) and vs a naive
    pipeline, TransformerLens `run_with_cache` then zarr writes in the same thread (target >= 2x).
    Measured in the same runs, to show where the time goes: the decoder forward alone over the
    same batches, and the store path alone (the background writer given units already captured in
    memory).

    python benchmarks/dump.py [--runs 3] [--tokens-a 8192] [--tokens-b 65536]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

import microscope
from microscope.activations.capture import BufferPool, make_batch
from microscope.activations.dump import dump
from microscope.activations.layout import codecs
from microscope.activations.pipeline import BackgroundWriter, capture_units, pack_batches
from microscope.activations.planning import make_plan
from microscope.activations.schema import open_group
from microscope.activations.settings import DumpSettings
from microscope.activations.writer import create_store
from microscope.prompts import Prompt

WRITE_HOOKS = ("blocks.*.hook_resid_pre,blocks.*.hook_resid_mid,blocks.*.hook_resid_post,"
               "blocks.*.hook_attn_out,blocks.*.hook_mlp_out")


def word_prompts(n: int, words: int, seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    vocab = ("river stone lamp cloud green table window bird music paper silver garden door winter "
             "apple road light tree horse dream glass north quiet ocean bread candle storm field").split()
    return [Prompt(" ".join(rng.choice(vocab) for _ in range(words))) for _ in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dump_batches(plan, batch_tokens: int):
    """(unit, batch) for every forward batch the dump runs, in its order."""
    for unit in plan.units:
        for start, stop in pack_batches(plan, unit, batch_tokens):
            yield unit, make_batch(plan, unit, start, stop, 1)


def forward_only(scope, plan, batch_tokens: int) -> None:
    """The plain forward over exactly the batches the dump runs (full model, logits included)."""
    with torch.inference_mode():
        for _, batch in dump_batches(plan, batch_tokens):
            scope.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)


def bench_a(runs: int, tokens: int, tmp: Path) -> dict:
    scope = microscope.load("random:opt-125m")
    prompts = word_prompts(tokens // 128, 127)
    hooks, batch_tokens = "blocks.*.hook_resid_post", 2048
    plan, _ = make_plan(scope, prompts, hooks, DumpSettings(dtype="fp16"))
    n_tokens = int(plan.kept_offsets[-1])
    forward, dumped = [], []
    for i in range(runs):
        forward.append(n_tokens / timed(lambda: forward_only(scope, plan, batch_tokens)))
        out = tmp / f"a{i}.zarr"
        summary = dump(scope, prompts, hooks, str(out), dtype="fp16", batch_tokens=batch_tokens)
        dumped.append(summary.n_tokens / summary.seconds)
        shutil.rmtree(out)
    f, d = statistics.median(forward), statistics.median(dumped)
    return {"tokens": n_tokens, "forward_tok_s": f, "dump_tok_s": d, "ratio": d / f}


def tiny_write_bound_model(folder: Path):
    config = OPTConfig(vocab_size=50272, hidden_size=64, num_hidden_layers=8, ffn_dim=16,
                       num_attention_heads=1, word_embed_proj_dim=64, max_position_embeddings=512,
                       dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = OPTForCausalLM(config).eval()
    scope = microscope.load(model)
    scope.tokenizer.save_pretrained(folder)          # TransformerLens wants a tokenizer with a path
    return scope, AutoTokenizer.from_pretrained(folder)


def naive_pipeline(scope, tokenizer, plan, out: Path, batch_tokens: int) -> None:
    """TransformerLens run_with_cache per batch, then zarr writes of the unpadded rows, one thread."""
    from transformer_lens import TransformerBridge

    bridge = TransformerBridge.boot_transformers("facebook/opt-125m", hf_model=scope.model, tokenizer=tokenizer)
    names = [h.name for h in plan.hooks]
    group = zarr.open_group(str(out), mode="w")
    arrays = {n: group.create_array(n, shape=(int(plan.kept_offsets[-1]), h.width), dtype=np.float16,
                                    chunks=(plan.chunk_rows, h.width), compressors=codecs(None), fill_value=0)
              for n, h in zip(names, plan.hooks)}
    row = 0
    with torch.inference_mode():
        for _, batch in dump_batches(plan, batch_tokens):
            _, cache = bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                             names_filter=lambda n: n in arrays)
            keep = batch.attention_mask.bool()
            for n in names:
                rows = cache[n][keep].to(torch.float16).numpy()
                arrays[n][row:row + len(rows)] = rows
            row += int(keep.sum())


def decoder_forward(scope, plan, batch_tokens: int) -> None:
    """The decoder alone over the dump's batches: the compute a dump of every block's hooks needs."""
    with torch.inference_mode():
        for _, batch in dump_batches(plan, batch_tokens):
            scope.model.model.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      use_cache=False)


def store_path_alone(plan, stagings: list, out: Path) -> float:
    """Seconds the background writer takes to write already-captured units into a laid-out store."""
    group = open_group(str(out), mode="w")
    n = len(plan.prompt_tokens)
    create_store(group, plan, [""] * n, [{}] * n, [], {})
    writer = BackgroundWriter(group, plan)
    start = time.perf_counter()
    for staging in stagings:
        writer.submit(staging)
    writer.close()
    return time.perf_counter() - start


def np_save_same_bytes(plan, out: Path, fsync: bool) -> None:
    """np.save of blocks shaped like the dump's (one file per hook per unit)."""
    out.mkdir()
    rng = np.random.default_rng(0)
    blocks = {h.name: rng.standard_normal((plan.chunk_rows, h.width)).astype(np.float16) for h in plan.hooks}
    for unit in plan.units:
        rows = -(-unit.n_tokens // plan.chunk_rows) * plan.chunk_rows
        for h in plan.hooks:
            path = out / f"{h.name}.{unit.index}.npy"
            with open(path, "wb") as f:
                np.save(f, blocks[h.name][:rows])
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())


def bench_b(runs: int, tokens: int, tmp: Path) -> dict:
    scope, tokenizer = tiny_write_bound_model(tmp / "tok")
    prompts = word_prompts(tokens // 64, 63, seed=1)
    batch_tokens = 4096
    plan, _ = make_plan(scope, prompts, WRITE_HOOKS, DumpSettings(dtype="fp16"))
    nbytes = sum(-(-u.n_tokens // plan.chunk_rows) * plan.chunk_rows * h.width * 2
                 for u in plan.units for h in plan.hooks)
    # Every unit's rows captured in host memory exactly as the dump captures them, nothing written.
    stagings = list(capture_units(scope, plan, range(len(plan.units)), batch_tokens, BufferPool()))
    results = {"dump": [], "np.save": [], "np.save+fsync": [], "naive": [], "store path": [], "forward s": []}
    for i in range(runs):
        out = tmp / f"b{i}"
        # Every measurement starts with no dirty pages left by the one before (os.sync, untimed).
        os.sync()
        summary = dump(scope, prompts, WRITE_HOOKS, str(out / "dump.zarr"), dtype="fp16", batch_tokens=batch_tokens)
        results["dump"].append(summary.bytes_written / 1e6 / summary.seconds)
        os.sync()
        results["np.save"].append(nbytes / 1e6 / timed(lambda: np_save_same_bytes(plan, out / "npy", False)))
        os.sync()
        results["np.save+fsync"].append(nbytes / 1e6 / timed(lambda: np_save_same_bytes(plan, out / "npyf", True)))
        os.sync()
        naive_bytes = int(plan.kept_offsets[-1]) * sum(h.width for h in plan.hooks) * 2
        results["naive"].append(naive_bytes / 1e6 / timed(
            lambda: naive_pipeline(scope, tokenizer, plan, out / "naive.zarr", batch_tokens)))
        os.sync()
        results["store path"].append(nbytes / 1e6 / store_path_alone(plan, stagings, out / "alone.zarr"))
        results["forward s"].append(timed(lambda: decoder_forward(scope, plan, batch_tokens)))
        shutil.rmtree(out)
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"tokens": int(plan.kept_offsets[-1]), "hooks": len(plan.hooks), "mb": nbytes / 1e6, **med,
            "vs_np_save": med["dump"] / med["np.save"], "vs_fsync": med["dump"] / med["np.save+fsync"],
            "vs_naive": med["dump"] / med["naive"], "store_vs_np_save": med["store path"] / med["np.save"],
            "forward_vs_np_save": med["forward s"] / (nbytes / 1e6 / med["np.save"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens-a", type=int, default=8192)
    parser.add_argument("--tokens-b", type=int, default=65536)
    parser.add_argument("--only", choices=["a", "b"], default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dump-"))
    try:
        if args.only in (None, "a"):
            a = bench_a(args.runs, args.tokens_a, tmp)
            print(f"(a) random:opt-125m resid_post fp16, {a['tokens']} tokens: forward {a['forward_tok_s']:.0f} "
                  f"tok/s, dump {a['dump_tok_s']:.0f} tok/s, ratio {a['ratio']:.2f}x (target >= 0.9x)")
        if args.only in (None, "b"):
            b = bench_b(args.runs, args.tokens_b, tmp)
            print(f"(b) write-bound tiny OPT, {b['hooks']} hooks, {b['tokens']} tokens, {b['mb']:.0f} MB: "
                  f"dump {b['dump']:.0f} MB/s, np.save {b['np.save']:.0f} MB/s, np.save+fsync "
                  f"{b['np.save+fsync']:.0f} MB/s, naive TL+zarr {b['naive']:.0f} MB/s; dump/np.save "
                  f"{b['vs_np_save']:.2f}x (target >= 0.5x), dump/fsync {b['vs_fsync']:.2f}x, "
                  f"dump/naive {b['vs_naive']:.2f}x (target >= 2x). Where the time goes: the store path "
                  f"alone {b['store path']:.0f} MB/s ({b['store_vs_np_save']:.2f}x np.save); the decoder "
                  f"forward alone {b['forward s']:.2f} s, {b['forward_vs_np_save']:.2f}x np.save's time")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
