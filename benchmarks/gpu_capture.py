"""GPU capture throughput: bare forward vs our capture and dump vs TransformerLens and nnsight.

    python benchmarks/gpu_capture.py                      # random:opt-1.3b and 6.7b, bf16 and fp16
    python benchmarks/gpu_capture.py --record             # also append the table to benchmarks/RESULTS.md
    python benchmarks/gpu_capture.py --dry-run            # CPU, a tiny model: checks the code path only

For each model and dtype, every `blocks.*.hook_resid_post` is captured for the same prompts, packed
into batches by token budget (`--batch-tokens` padded tokens per forward). Rows, median of
`--repeats` runs, ratios against the bare forward measured in the same run:
- bare forward: the model alone;
- capture (no disk): the dump's own capture path (`pipeline.capture_units`: forward + fused
  gather/cast + side-stream copies into pinned unit buffers), buffers recycled once their copies
  land, nothing written: the capture overhead without a disk;
- our dump: `microscope.activations.dump.dump` into a zarr store (the store pipeline);
- TransformerLens run_with_cache + zarr; nnsight save + zarr: the naive pipelines (kept rows
  copied to the host per hook, written with zarr's array API).
MB/s counts captured bytes; "of D2H" compares it with a pinned device-to-host copy measured in
the same run. The issue's target: dump >= 0.9x bare (where disk allows), >= 2x both naive ones.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
WORDS = ("the model reads a long prompt about numbers and words then it answers with care while "
         "nobody checks whether loops repeat or instructions follow").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="random:opt-1.3b,random:opt-6.7b")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward batch")
    p.add_argument("--prompts", type=int, default=256, help="prompts per run")
    p.add_argument("--max-words", type=int, default=400, help="prompt lengths are uniform in [8, max-words] words")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="folder for the stores (default: a temporary folder)")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: capture,dump,tl,nnsight")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, one repeat: checks the code path")
    return p.parse_args(argv)


def make_prompts(n: int, max_words: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, max_words + 1, (n,), generator=g).tolist()
    picks = torch.randint(0, len(WORDS), (sum(lengths),), generator=g).tolist()
    texts, at = [], 0
    for length in lengths:
        texts.append(" ".join(WORDS[i] for i in picks[at:at + length]))
        at += length
    return texts


def pack(mask: torch.Tensor, batch_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) prompt ranges whose padded size (prompts x longest) stays within the budget."""
    lengths = mask.sum(1).tolist()
    batches, start = [], 0
    while start < len(lengths):
        stop, longest = start + 1, lengths[start]
        while stop < len(lengths) and (stop - start + 1) * max(longest, lengths[stop]) <= batch_tokens:
            longest, stop = max(longest, lengths[stop]), stop + 1
        batches.append((start, stop))
        start = stop
    return batches


def batches_of(ids: torch.Tensor, mask: torch.Tensor, batch_tokens: int, device):
    """(input_ids, attention_mask, flat index of kept tokens) per batch, trimmed to the longest prompt."""
    out = []
    for start, stop in pack(mask, batch_tokens):
        m = mask[start:stop]
        longest = int(m.sum(1).max())
        m = m[:, :longest]
        out.append((ids[start:stop, :longest].to(device), m.to(device), m.reshape(-1).nonzero().reshape(-1)))
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def d2h_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float | None:
    """Bytes/s of one pinned device-to-host copy (median)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    times = [timed(lambda: dst.copy_(src, non_blocking=True), device) for _ in range(repeats)]
    return nbytes / statistics.median(times)


def run_bare(scope, batches) -> None:
    for ids, mask, _ in batches:
        scope.model(input_ids=ids, attention_mask=mask, use_cache=False)


def run_capture(scope, plan, batch_tokens: int) -> None:
    """The dump's capture path without the writer: every unit staged, then its buffers recycled."""
    from microscope.activations.capture import BufferPool
    from microscope.activations.pipeline import capture_units

    pool = BufferPool(pin=scope.device.type == "cuda")
    for staging in capture_units(scope, plan, range(len(plan.units)), batch_tokens, pool):
        for event in staging.done_events:
            event.synchronize()
        for name in staging.buffers:
            staging.release(name)


def run_dump(scope, texts, names, dtype_name, batch_tokens, out: Path) -> None:
    from microscope.activations.dump import dump

    shutil.rmtree(out, ignore_errors=True)
    dump(scope, texts, names, str(out), dtype=dtype_name, batch_tokens=batch_tokens)


def zarr_arrays(out: Path, names, n_rows: int, width: int, dtype: torch.dtype):
    """One pre-sized zarr array per hook, as a naive pipeline would write them."""
    import numpy as np
    import zarr

    shutil.rmtree(out, ignore_errors=True)
    group = zarr.open_group(str(out), mode="w")
    np_dtype = np.uint16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    return {n: group.create_array(n.replace(".", "_"), shape=(n_rows, width), dtype=np_dtype,
                                  chunks=(4096, width)) for n in names}


def host_rows(x: torch.Tensor, index: torch.Tensor, dtype: torch.dtype):
    """The naive way: gather on device, copy to the host synchronously, numpy for zarr."""
    rows = x.reshape(-1, x.shape[-1])[index.to(x.device)].to(dtype).cpu()
    return rows.view(torch.int16).numpy().view("uint16") if dtype == torch.bfloat16 else rows.numpy()


def run_transformer_lens(model, batches, names, width, dtype, out: Path) -> None:
    arrays = zarr_arrays(out, names, sum(len(i) for _, _, i in batches), width, dtype)
    row = 0
    for ids, mask, index in batches:
        _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in arrays)
        for n in names:
            arrays[n][row:row + len(index)] = host_rows(cache[n], index, dtype)
        row += len(index)


def run_nnsight(lm, layers, batches, names, width, dtype, out: Path) -> None:
    arrays = zarr_arrays(out, names, sum(len(i) for _, _, i in batches), width, dtype)
    row = 0
    for ids, mask, index in batches:
        saved = []   # nnsight runs the with-block's source itself: append, no comprehension
        with lm.trace({"input_ids": ids, "attention_mask": mask}):
            for layer in layers:
                saved.append(layer.output.save())
        for n, value in zip(names, saved):
            arrays[n][row:row + len(index)] = host_rows(value, index, dtype)
        row += len(index)


def load_transformer_lens(scope, dtype: torch.dtype):
    """TransformerLens 4.x wraps the HF model in a TransformerBridge (HookedTransformer is gone);
    `to_transformer_lens` hands it the same weights (the model is already in `dtype`). The bridge
    switches the model to eager attention, so this variant runs last."""
    from microscope.interop import to_transformer_lens

    return to_transformer_lens(scope)


def load_nnsight(scope):
    from nnsight import LanguageModel

    lm = LanguageModel(scope.model, tokenizer=scope.tokenizer)
    return lm, lm.model.decoder.layers


def measure(args, model_name: str, dtype_name: str, device: torch.device, workdir: Path) -> list[dict]:
    import microscope

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    scope = tiny_scope(dtype) if args.dry_run else microscope.load(model_name, device=str(device), dtype=dtype_name)
    names = scope.resolve_names(["blocks.*.hook_resid_post"])
    width = scope.config.hidden_size
    texts = make_prompts(args.prompts, args.max_words)
    ids, mask = scope.tokenize(texts, max_length=scope.config.max_position_embeddings, truncation=True)
    batches = batches_of(ids, mask, args.batch_tokens, device)
    tokens = int(mask.sum())
    captured = tokens * len(names) * width * dtype.itemsize
    skip = set(filter(None, args.skip.split(",")))
    paths: dict[str, Callable[[], None]] = {"bare forward": lambda: run_bare(scope, batches)}
    if "capture" not in skip:
        from microscope.activations.planning import make_plan
        from microscope.activations.settings import DumpSettings
        from microscope.prompts import Prompt

        plan, _ = make_plan(scope, [Prompt(t) for t in texts], names, DumpSettings(dtype=dtype_name))
        paths["capture (no disk)"] = lambda: run_capture(scope, plan, args.batch_tokens)
    if "dump" not in skip:
        paths["our dump (zarr)"] = lambda: run_dump(scope, texts, names, dtype_name, args.batch_tokens,
                                                    workdir / "dump.zarr")
    failures = {}
    if "nnsight" not in skip:
        try:
            lm, layers = load_nnsight(scope)
            paths["nnsight save + zarr"] = lambda: run_nnsight(lm, layers, batches, names, width, dtype,
                                                              workdir / "nnsight.zarr")
        except Exception as err:  # reported in the table, not hidden
            failures["nnsight save + zarr"] = f"{type(err).__name__}: {str(err)[:80]}"
    if "tl" not in skip:
        bridge = []

        def transformer_lens() -> None:   # built on first use: it makes the model eager, so it runs last
            if not bridge:
                bridge.append(load_transformer_lens(scope, dtype))
            run_transformer_lens(bridge[0], batches, names, width, dtype, workdir / "tl.zarr")
        paths["TransformerLens run_with_cache + zarr"] = transformer_lens
    bandwidth = d2h_bandwidth(device)
    rows = []
    with torch.inference_mode():
        for path, fn in paths.items():
            try:
                fn()                                       # warm-up: kernels compiled, buffers pinned
                seconds = statistics.median(timed(fn, device) for _ in range(args.repeats))
            except Exception as err:
                failures[path] = f"{type(err).__name__}: {str(err)[:80]}"
                continue
            moved = 0 if path == "bare forward" else captured
            rows.append(dict(model=model_name, dtype=dtype_name, path=path, tokens_per_s=tokens / seconds,
                             mb_per_s=moved / seconds / 1e6 if moved else None,
                             d2h_share=moved / seconds / bandwidth if moved and bandwidth else None))
    bare = next((r["tokens_per_s"] for r in rows if r["path"] == "bare forward"), None)
    for r in rows:
        r["vs_bare"] = r["tokens_per_s"] / bare if bare else None
    for path, why in failures.items():
        rows.append(dict(model=model_name, dtype=dtype_name, path=path, failed=why))
    for r in rows:
        r["d2h_gb_per_s"] = bandwidth / 1e9 if bandwidth else None
    return rows


def tiny_scope(dtype: torch.dtype):
    """--dry-run: a 2-layer OPT with random weights on the CPU (fp32: CPU matmuls in half are slow)."""
    import microscope
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=50272, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                       word_embed_proj_dim=64, max_position_embeddings=512)
    return microscope.load(OPTForCausalLM(config).eval())


def format_table(rows: list[dict]) -> str:
    """A markdown table of the measured rows (failures say why)."""
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| model | dtype | path | tokens/s | x bare | MB/s | of D2H (GB/s) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['path']} | not run: {r['failed']} | | | |")
            continue
        share = num(r.get("d2h_share"), ".0%")
        bw = num(r.get("d2h_gb_per_s"), ".1f")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['path']} | {r['tokens_per_s']:,.0f} | "
                     f"{num(r.get('vs_bare'), '.2f')} | {num(r.get('mb_per_s'), ',.1f')} | "
                     f"{share}{f' ({bw})' if share else ''} |")
    return "\n".join(lines)


def record(table: str, device_name: str, args: argparse.Namespace) -> None:
    stamp = datetime.date.today().isoformat()
    with open(RESULTS, "a") as f:
        f.write(f"\n## GPU capture — {device_name}, {stamp}\n\n`python benchmarks/gpu_capture.py "
                f"{' '.join(sys.argv[1:])}`: {args.prompts} prompts of 8-{args.max_words} words, "
                f"{args.batch_tokens} padded tokens per batch, all resid_post layers, median of "
                f"{args.repeats} runs.\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device, device_name = torch.device("cpu"), "CPU (dry run, tiny model)"
        args.models, args.repeats, args.prompts, args.max_words = "tiny", 1, min(args.prompts, 12), 40
        args.batch_tokens = min(args.batch_tokens, 256)
    elif not torch.cuda.is_available():
        print("gpu_capture.py needs a CUDA device and none is visible (torch.cuda.is_available() is False). "
              "Run it on a GPU machine, or pass --dry-run to check the code path on the CPU.", file=sys.stderr)
        return 2
    else:
        device, device_name = torch.device("cuda"), torch.cuda.get_device_name()
    workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_capture_"))
    rows = []
    try:
        for model_name in args.models.split(","):
            for dtype_name in args.dtypes.split(","):
                rows += measure(args, model_name, dtype_name, device, workdir)
                print(format_table(rows[-6:]), flush=True)
    finally:
        if not args.out:
            shutil.rmtree(workdir, ignore_errors=True)
    table = format_table(rows)
    print(f"\n{device_name}\n\n{table}")
    if args.record:
        if args.dry_run:
            print("--record ignored in a dry run: dry-run numbers are not results", file=sys.stderr)
        else:
            record(table, device_name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
