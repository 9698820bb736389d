"""The dump job: prompts -> tokenisation pass -> store layout -> forward passes -> committed units.

    from microscope.activations.dump import dump
    summary = dump("organism", "demo", "blocks.*.hook_resid_post", "activations/demo.zarr")

One process, or every rank of a `torchrun` job (see `distributed.py`): rank 0 lays the store out,
each replica leader computes its share of the uncommitted units. Batches never cross a unit, so a
unit's rows are the same whichever rank, world size or run computes it: a resumed dump is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zarr

import microscope
from microscope.activations.capture import BufferPool, Capture, UnitStaging, make_batch
from microscope.activations.distributed import (Ranks, barrier, broadcast_object, init_ranks,
                                                shutdown, sum_over_ranks)
from microscope.activations.layout import default_chunk_rows, is_pattern_hook, store_dtype
from microscope.activations.pipeline import BackgroundWriter, pack_batches
from microscope.activations.units import committed_units, plan_units
from microscope.activations.writer import (HookSpec, StorePlan, check_resume, create_store, open_group,
                                           store_is_complete)
from microscope.energy import EnergyMeter
from microscope.errors import MicroscopeError, PromptError, StoreError
from microscope.models.loading import RANDOM_SEED
from microscope.prompts import Prompt, load_prompts, prompts_hash
from microscope.provenance import provenance

Positions = str | Sequence[Sequence[int]]


@dataclass
class DumpSummary:
    """What a dump did (this process's share for the timing figures; totals for the store)."""

    out: str
    model: str
    hooks: list[str]
    dtype: str
    n_prompts: int
    n_tokens: int
    truncated_prompts: int
    units_total: int
    units_already_committed: int
    units_run: int
    bytes_written: int
    seconds: float
    energy_joules: float | None
    world_size: int
    tokens_run: int          # tokens this process ran forward (for tokens/s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_run / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.seconds if self.seconds else 0.0


class _ForwardDone(Exception):
    """Raised by the capture hook once every requested hook fired: skips the rest of the model."""


def dump(model, prompts, hooks: str | Sequence[str], out, *, dtype: str = "fp16",
         positions: Positions = "all", batch_tokens: int = 4096, max_length: int | None = None,
         resume: bool = False, pattern_heads: Sequence[int] | None = None, chunk_rows: int | None = None,
         unit_rows: int | None = None, compress: str | None = None, storage_options: dict | None = None,
         device: str | None = None, gpus_per_model: int = 1, max_pending_bytes: int = 1 << 30,
         writer_threads: int = 2, seed: int = 0, command_line: str | None = None,
         on_progress: Callable[[dict], None] | None = None) -> DumpSummary:
    """Capture `hooks` for every prompt into the store at `out` (folder, fsspec URL or zarr Store).

    model: a `Scope` or any `microscope.load` source. prompts: a file, a built-in set name or a
    list. hooks: names or glob patterns (comma-separated string or list). dtype: fp32/fp16/bf16.
    positions: "all", "last", "field:NAME" (a metadata field listing positions or a 0/1 mask), or
    one list of positions per prompt. max_length: truncate longer prompts to this many tokens
    (without it, a prompt longer than the model's context is an error). resume: continue a store,
    recomputing only uncommitted units (settings must match). on_progress receives
    {"tokens", "total", "bytes", "units"} (this process's forward tokens) after every batch."""
    ranks = init_ranks(gpus_per_model)
    try:
        return _dump(ranks, model, prompts, hooks, out, dtype=dtype, positions=positions,
                     batch_tokens=batch_tokens, max_length=max_length, resume=resume,
                     pattern_heads=pattern_heads, chunk_rows=chunk_rows, unit_rows=unit_rows,
                     compress=compress, storage_options=storage_options, device=device,
                     max_pending_bytes=max_pending_bytes, writer_threads=writer_threads, seed=seed,
                     command_line=command_line, on_progress=on_progress)
    finally:
        shutdown(ranks)


def _dump(ranks: Ranks, model, prompts, hooks, out, *, dtype, positions, batch_tokens, max_length, resume,
          pattern_heads, chunk_rows, unit_rows, compress, storage_options, device, max_pending_bytes,
          writer_threads, seed, command_line, on_progress) -> DumpSummary:
    started = time.perf_counter()
    torch.manual_seed(seed)
    where = out if isinstance(out, str) else repr(out)
    scope = plan = prompt_list = None
    status = "ok"
    if ranks.is_leader:
        try:
            prompt_list = load_prompts(prompts)
            scope = _load_scope(model, ranks, device)
            plan, truncated = make_plan(scope, prompt_list, hooks, dtype=dtype, positions=positions,
                                        max_length=max_length, pattern_heads=pattern_heads,
                                        chunk_rows=chunk_rows, unit_rows=unit_rows, compress=compress)
            if ranks.is_main:
                _prepare_store(out, plan, scope, prompt_list, resume, compress, storage_options, where,
                               _provenance(scope, plan, truncated, seed, command_line))
        except MicroscopeError as err:
            if not ranks.distributed:
                raise
            status = err
    # Rank 0 decides; every rank stops with the same error rather than waiting at a barrier.
    decided = broadcast_object(ranks, status if ranks.is_main else None)
    for outcome in (decided, status):
        if isinstance(outcome, BaseException):
            raise outcome
    group = open_group(out, mode="r+", storage_options=storage_options)
    result = {"tokens": 0, "bytes": 0, "units": 0, "energy": None}
    # Every rank splits the same pending list: rank 0's view, read before any unit of this run
    # commits (a rank reading later would see another set and deal the units differently).
    committed_before = broadcast_object(ranks, committed_units(group) if ranks.is_main else None)
    if ranks.is_leader:
        check_resume(group, plan.fingerprint, where)
        pending = [u.index for u in plan.units if not committed_before[u.index]]
        result = _run_units(scope, plan, group, ranks.my_units(pending), batch_tokens, max_pending_bytes,
                            writer_threads, on_progress, ranks)
    barrier(ranks)
    measured = sum_over_ranks(ranks, float(result["energy"] is not None))
    energy = sum_over_ranks(ranks, result["energy"] or 0.0) if measured else None
    bytes_written = int(sum_over_ranks(ranks, result["bytes"]))
    seconds = time.perf_counter() - started
    if ranks.is_main:
        _finish(group, energy, seconds, ranks)
    layout = group.attrs["microscope"]["layout"]
    return DumpSummary(out=where, model=str(group.attrs["microscope"]["fingerprint"]["model"]),
                       hooks=list(layout["hooks"]), dtype=layout["dtype"], n_prompts=layout["n_prompts"],
                       n_tokens=layout["n_tokens"],
                       truncated_prompts=group.attrs["microscope"]["provenance"]["truncated_prompts"],
                       units_total=layout["n_units"], units_already_committed=int(committed_before.sum()),
                       units_run=int(sum_over_ranks(ranks, result["units"])), bytes_written=bytes_written,
                       seconds=seconds, energy_joules=energy,
                       world_size=ranks.world_size, tokens_run=result["tokens"])


def _load_scope(model, ranks: Ranks, device: str | None):
    if not isinstance(model, (str, os.PathLike)):
        return model  # a Scope already
    if torch.cuda.is_available():
        devices = ranks.replica_devices()
        if len(devices) == 1:
            return microscope.load(model, device=device or f"cuda:{devices[0]}")
        memory = {i: torch.cuda.get_device_properties(i).total_memory for i in devices}
        return microscope.load(model, device_map="balanced", max_memory=memory)
    return microscope.load(model, device=device)


def make_plan(scope, prompt_list: list[Prompt], hooks, *, dtype: str = "fp16", positions: Positions = "all",
              max_length: int | None = None, pattern_heads: Sequence[int] | None = None,
              chunk_rows: int | None = None, unit_rows: int | None = None,
              compress: str | None = None) -> tuple[StorePlan, int]:
    """The tokenisation pass: token ids, kept positions, hook shapes, units. Returns (plan, truncated)."""
    patterns = [h.strip() for h in hooks.split(",")] if isinstance(hooks, str) else list(hooks)
    names = scope.resolve_names([p for p in patterns if p])
    if not names:
        raise StoreError(f"--hooks {hooks!r} selects no hook")
    tokens, truncated = tokenize_prompts(scope, prompt_list, max_length)
    kept, positions_key = kept_positions(positions, tokens, prompt_list)
    specs = probe_hooks(scope, names, tokens[0], pattern_heads)
    store = store_dtype(dtype)
    widest = max(h.width for h in specs if not h.is_pattern) if any(not h.is_pattern for h in specs) else 1
    chunk_rows = chunk_rows or default_chunk_rows(widest * store.itemsize)
    unit_rows = unit_rows or chunk_rows
    kept_counts = np.array([len(k) for k in kept], np.int64)
    pattern_counts = (np.array([int(np.sum(k + 1)) for k in kept], np.int64) if any(h.is_pattern for h in specs)
                      else np.zeros(len(kept), np.int64))
    # Pattern chunks: about 4 MiB, but no larger than the biggest unit's rows (each unit pads its
    # last chunk with zeros).
    largest = max(u.n_pattern_rows for u in plan_units(kept_counts, pattern_counts, unit_rows, chunk_rows, 1))
    pattern_width = max((h.width for h in specs if h.is_pattern), default=1)
    pattern_chunk_rows = min(default_chunk_rows(pattern_width * store.itemsize, 4 << 20, max_rows=1 << 16),
                             max(64, 2 ** math.ceil(math.log2(max(1, largest)))))
    units = plan_units(kept_counts, pattern_counts, unit_rows, chunk_rows, pattern_chunk_rows)
    token_digest = hashlib.sha256()
    for t in tokens:
        token_digest.update(np.int64(len(t)).tobytes() + t.astype(np.int64).tobytes())
    info = getattr(scope, "info", None)
    fingerprint = {
        "model": scope.source, "weights_hash": info["weights_hash"] if info is not None else None,
        "hooks": names, "dtype": store.name, "positions": positions_key,
        "pattern_heads": list(pattern_heads) if pattern_heads is not None else None,
        "prompts_hash": prompts_hash(prompt_list), "tokens_hash": "sha256:" + token_digest.hexdigest(),
        "max_length": max_length, "chunk_rows": chunk_rows, "unit_rows": unit_rows,
        "pattern_chunk_rows": pattern_chunk_rows, "compress": compress or "none"}
    plan = StorePlan(specs, store, tokens, kept, units, chunk_rows, pattern_chunk_rows, fingerprint)
    return plan, truncated


def tokenize_prompts(scope, prompt_list: list[Prompt], max_length: int | None) -> tuple[list[np.ndarray], int]:
    """Token ids of every prompt as `scope.tokenize` makes them, padding stripped, truncated to
    `max_length` (the documented behaviour: the first max_length tokens are kept)."""
    context = scope.config.max_position_embeddings
    if max_length is not None and not 0 < max_length <= context:
        raise PromptError(f"--max-length {max_length} must be between 1 and the model's context ({context})")
    tokens: list[np.ndarray] = []
    for start in range(0, len(prompt_list), 256):
        texts = [p.text for p in prompt_list[start:start + 256]]
        # Cut at context + 1 so over-long prompts are seen here, and truncated or refused below.
        ids, mask = scope.tokenize(texts, max_length=context + 1, truncation=True)
        for row, row_mask in zip(ids, mask):
            tokens.append(row[row_mask.bool()].numpy().astype(np.int32))
    truncated = 0
    for i, t in enumerate(tokens):
        if len(t) == 0:
            raise PromptError(f"prompt {i} tokenizes to nothing; remove it")
        if max_length is not None and len(t) > max_length:
            tokens[i], truncated = t[:max_length], truncated + 1
        elif len(t) > context:
            raise PromptError(f"prompt {i} is longer than the model's context of {context} tokens; "
                              f"pass --max-length N (N <= {context}) to keep its first N tokens")
    return tokens, truncated


def kept_positions(positions: Positions, tokens: list[np.ndarray],
                   prompt_list: list[Prompt]) -> tuple[list[np.ndarray], str]:
    """Sorted positions to store per prompt, and the key a resume must match."""
    if positions == "all":
        return [np.arange(len(t), dtype=np.int64) for t in tokens], "all"
    if positions == "last":
        return [np.array([len(t) - 1], dtype=np.int64) for t in tokens], "last"
    if isinstance(positions, str) and positions.startswith("field:"):
        field = positions[len("field:"):]
        missing = [i for i, p in enumerate(prompt_list) if field not in p.metadata]
        if missing:
            raise PromptError(f"--positions {positions}: prompt {missing[0]} has no {field!r} field")
        lists = [p.metadata[field] for p in prompt_list]
    elif isinstance(positions, str):
        raise PromptError(f"--positions {positions!r}: use all, last, or field:NAME")
    else:
        lists = list(positions)
        if len(lists) != len(tokens):
            raise PromptError(f"positions: {len(lists)} masks for {len(tokens)} prompts")
    kept = []
    for i, (spec, t) in enumerate(zip(lists, tokens)):
        spec = np.asarray(spec)
        if spec.dtype == bool or (spec.size == len(t) and set(np.unique(spec)) <= {0, 1} and spec.size > 1):
            if spec.size != len(t):
                raise PromptError(f"prompt {i}: position mask has {spec.size} entries for {len(t)} tokens")
            chosen = np.flatnonzero(spec)
        else:
            chosen = np.where(spec < 0, spec + len(t), spec).astype(np.int64)
            if chosen.size and (chosen.min() < 0 or chosen.max() >= len(t)):
                raise PromptError(f"prompt {i}: positions {spec.tolist()} fall outside its {len(t)} tokens")
        kept.append(np.unique(chosen).astype(np.int64))
    digest = hashlib.sha256(b"".join(np.int64(len(k)).tobytes() + k.tobytes() for k in kept))
    return kept, "positions:sha256:" + digest.hexdigest()


def probe_hooks(scope, names: list[str], first_prompt: np.ndarray,
                pattern_heads: Sequence[int] | None) -> list[HookSpec]:
    """Feature shapes of every hook, from one short forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(activation, hook):
        shapes[hook.name] = tuple(activation.shape)

    ids = torch.from_numpy(first_prompt[:2].astype(np.int64))[None]
    with torch.inference_mode(), scope.hooks({n: record for n in names}):
        scope.model(input_ids=ids.to(_input_device(scope)), attention_mask=torch.ones_like(ids).to(_input_device(scope)))
    specs = []
    for name in names:
        shape = shapes[name]
        if is_pattern_hook(name):
            heads = tuple(range(shape[1])) if pattern_heads is None else tuple(pattern_heads)
            if any(not 0 <= h < shape[1] for h in heads):
                raise StoreError(f"--pattern-heads {list(heads)}: {name} has heads 0..{shape[1] - 1}")
            specs.append(HookSpec(name, (shape[1],), heads))
        else:
            specs.append(HookSpec(name, shape[2:]))
    return specs


def _input_device(scope) -> torch.device:
    return scope.model.get_input_embeddings().weight.device


def _prepare_store(out, plan: StorePlan, scope, prompt_list: list[Prompt], resume: bool, compress,
                   storage_options, where: str, provenance: dict) -> None:
    """Create the store, or check it for resume (a store never fully laid out is recreated)."""
    try:
        existing = open_group(out, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        existing = None
    if existing is not None and "microscope" not in existing.attrs and len(list(existing.keys())):
        raise StoreError(f"{where} holds a zarr group that is not an activation store; choose another --out")
    if existing is not None and store_is_complete(existing):
        if not resume:
            raise StoreError(f"{where} already holds a store; pass --resume to continue it, "
                             "or choose another --out (or delete it)")
        check_resume(existing, plan.fingerprint, where)
        return
    group = open_group(out, mode="w", storage_options=storage_options)
    create_store(group, plan, [p.text for p in prompt_list], [p.metadata for p in prompt_list],
                 _vocab(scope.tokenizer), provenance, compress)


def _vocab(tokenizer) -> list[str]:
    """Decoded string of each token id, so readers decode without the tokenizer."""
    ids = [[i] for i in range(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)   # fast tokenizers: 50k ids in ~0.1 s
    if backend is not None:
        return backend.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids)


def _provenance(scope, plan: StorePlan, truncated: int, seed: int, command_line: str | None) -> dict:
    """The shared provenance record (`microscope.provenance`) plus what the store was made with."""
    tok = scope.tokenizer
    info = getattr(scope, "info", None)
    return {
        **provenance(scope, seed=seed, command=command_line),
        "model_config": json.loads(scope.config.to_json_string()),
        "load_info": {k: v for k, v in dict(info).items() if k != "weights_hash"} if info is not None else None,
        "hooks": [h.name for h in plan.hooks],
        "dtype": plan.dtype.name,
        "positions": plan.fingerprint["positions"],
        "pattern_heads": plan.fingerprint["pattern_heads"],
        "max_length": plan.fingerprint["max_length"],
        "truncated_prompts": truncated,
        "prompts_hash": plan.fingerprint["prompts_hash"],
        "tokens_hash": plan.fingerprint["tokens_hash"],
        "tokenizer": {"class": type(tok).__name__, "name_or_path": getattr(tok, "name_or_path", None),
                      "vocab_size": len(tok)},
        "code_version": microscope.__version__,
        "seeds": {"dump": seed, "random_models": RANDOM_SEED},
    }


def _run_units(scope, plan: StorePlan, group: zarr.Group, unit_indices: list[int], batch_tokens: int,
               max_pending_bytes: int, writer_threads: int, on_progress, ranks: Ranks) -> dict:
    """Forward every batch of the given units, handing each finished unit to the background writer."""
    device = _input_device(scope)
    cuda = device.type == "cuda"
    pad_id = scope.config.pad_token_id if scope.config.pad_token_id is not None else 1
    writer = BackgroundWriter(group, plan, max_pending_bytes, writer_threads)
    capture = Capture(plan, stop=_ForwardDone)
    pool = BufferPool(pin=cuda)
    tokens = 0
    total = sum(len(plan.prompt_tokens[p]) for i in unit_indices for p in plan.units[i].prompts)
    devices = ranks.replica_devices() if torch.cuda.is_available() else None
    try:
        with EnergyMeter(devices) as meter, torch.inference_mode(), scope.hooks(capture.fns()):
            for index in unit_indices:
                unit = plan.units[index]
                staging = UnitStaging(plan, unit, pool)
                for start, stop in pack_batches(plan, unit, batch_tokens):
                    batch = make_batch(plan, unit, start, stop, pad_id)
                    capture.start(batch, staging)
                    try:
                        scope.model(input_ids=batch.input_ids.to(device, non_blocking=True),
                                    attention_mask=batch.attention_mask.to(device, non_blocking=True),
                                    use_cache=False)
                    except _ForwardDone:
                        pass
                    capture.finish()
                    tokens += batch.n_tokens
                    if on_progress is not None:
                        on_progress({"tokens": tokens, "total": total, "bytes": writer.bytes_written,
                                     "units": writer.units_committed})
                if cuda:
                    staging.done_event = torch.cuda.Event()
                    staging.done_event.record()
                writer.submit(staging)
            writer.close()
    except BaseException:
        writer.abort()
        raise
    if on_progress is not None:
        on_progress({"tokens": tokens, "total": total, "bytes": writer.bytes_written,
                     "units": writer.units_committed})
    return {"tokens": tokens, "bytes": writer.bytes_written, "units": writer.units_committed,
            "energy": meter.joules}


def _finish(group: zarr.Group, energy: float | None, seconds: float, ranks: Ranks) -> None:
    """Rank 0, after every rank finished: record completion, timing and energy."""
    attrs = dict(group.attrs["microscope"])
    provenance = dict(attrs["provenance"])
    provenance["last_run"] = {"seconds": round(seconds, 3), "world_size": ranks.world_size,
                              "gpus_per_model": ranks.gpus_per_model,
                              "all_units_committed": bool(committed_units(group).all())}
    if energy is not None:
        provenance["energy_joules"] = provenance.get("energy_joules", 0.0) + energy
    attrs["provenance"] = provenance
    group.attrs["microscope"] = attrs


def summary_dict(summary: DumpSummary) -> dict:
    return {**asdict(summary), "tokens_per_s": summary.tokens_per_s, "mb_per_s": summary.mb_per_s}
