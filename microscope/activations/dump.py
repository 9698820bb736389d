"""The dump job: prompts -> tokenisation pass -> store layout -> forward passes -> committed units.

    from microscope.activations.dump import dump
    summary = dump("organism", "demo", "blocks.*.hook_resid_post", "activations/demo.zarr")

One process, or every rank of a `torchrun` job (see `distributed.py`): rank 0 lays the store out,
each replica leader computes its share of the uncommitted units. Batches never cross a unit, so a
unit's rows are the same whichever rank, world size or run computes it: a resumed dump is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import zarr

from microscope import __version__
from microscope.activations.capture import BufferPool
from microscope.activations.distributed import (Ranks, barrier, broadcast_object, init_ranks,
                                                shutdown, sum_over_ranks)
from microscope.activations.energy import EnergyMeter
from microscope.activations.pipeline import BackgroundWriter, capture_units
from microscope.activations.layout import codecs, store_dtype
from microscope.activations.planning import (kept_heads, kept_positions, make_plan, resolve_hooks,
                                             tokenize_prompts)
from microscope.activations.schema import (StorePlan, check_store_path, existing_store_error,
                                           foreign_files_error, is_dump_group, open_group, store_is_complete)
from microscope.activations.settings import DumpSettings, takes_settings
from microscope.activations.units import committed_units
from microscope.activations.writer import check_resume, create_store
from microscope.errors import MicroscopeError
from microscope.models.loading import RANDOM_SEED
from microscope.names import is_pattern
from microscope.prompts import Prompt, load_prompts
from microscope.provenance import provenance
from microscope.scope import load


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


@takes_settings
def dump(model, prompts, hooks: str | Sequence[str], out, settings: DumpSettings | None = None, *,
         on_progress: Callable[[dict], None] | None = None, **options) -> DumpSummary:
    """Capture `hooks` for every prompt into the store at `out` (folder, fsspec URL or zarr Store).

    model: a `Scope` or any `microscope.load` source. prompts: a file, a built-in set name or a
    list. hooks: names or glob patterns (comma-separated string or list). settings: a
    `DumpSettings` (dtype, positions, resume, ...); `options` change single fields of it, e.g.
    ``dump(..., dtype="bf16", positions="last")``. on_progress receives
    {"tokens", "total", "bytes", "units"} (this process's forward tokens) after every batch.
    Every input is checked by `preflight` before the weights load; `out` may be a new path, an
    empty folder or a store a dump made, never a folder of other files (nothing is deleted)."""
    settings = (settings or DumpSettings()).but(**options)
    ranks = init_ranks(settings.gpus_per_model)
    try:
        return _dump(ranks, model, prompts, hooks, out, settings, on_progress)
    finally:
        shutdown(ranks)


@dataclass(frozen=True)
class DumpInputs:
    """A dump's inputs as `preflight` found them: the prompts and the hook names they select."""

    prompts: list[Prompt]
    hooks: list[str]          # hook names, in model order


def preflight(model, prompts, hooks: str | Sequence[str], out,
              settings: DumpSettings | None = None) -> DumpInputs:
    """Check what a dump is given without loading any weights (seconds, whatever the model's size).
    The first problem raises a `MicroscopeError` whose one-line message says what to fix.

    model: a `Scope`, or a `microscope.load` source read as its config and tokenizer only (a
    shapes-only model on the meta device). Checked: the dtype, compress, max_length, pattern_heads
    and positions settings; that `out` can be written and holds nothing but an activation store,
    and no finished one unless settings.resume (local paths; None skips this check); that the
    prompts load, tokenize and fit the model's context; that `hooks` select hooks of this model.
    A truncated weights file is refused by the load, before it reads any weight. `dump` calls
    this first; the arguments are `dump`'s. Returns the loaded prompts and resolved hook names."""
    settings = settings or DumpSettings()
    store_dtype(settings.dtype)
    codecs(settings.compress)
    if out is not None:
        check_store_path(out, settings.resume)
    prompt_list = load_prompts(prompts)
    shapes = load(model, device="meta") if isinstance(model, (str, os.PathLike)) else model
    names = resolve_hooks(shapes, hooks)
    for name in filter(is_pattern, names):
        kept_heads(settings.pattern_heads, shapes.config.num_attention_heads, name)
    tokens, _ = tokenize_prompts(shapes, prompt_list, settings.max_length)
    kept_positions(settings.positions, tokens, prompt_list)
    return DumpInputs(prompt_list, names)


def _dump(ranks: Ranks, model, prompts, hooks, out, settings: DumpSettings, on_progress) -> DumpSummary:
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    where = out if isinstance(out, str) else repr(out)
    scope = plan = None
    status = "ok"
    if ranks.is_leader:
        try:
            # Only rank 0 writes the store, so only it checks the path.
            inputs = preflight(model, prompts, hooks, out if ranks.is_main else None, settings)
            scope = _load_scope(model, ranks, settings.device)
            plan, truncated = make_plan(scope, inputs.prompts, inputs.hooks, settings)
            if ranks.is_main:
                _prepare_store(out, plan, scope, inputs.prompts, settings, where,
                               _provenance(scope, plan, truncated, settings))
        except MicroscopeError as err:
            if not ranks.distributed:
                raise
            status = err
    # Rank 0 decides; every rank stops with the same error rather than waiting at a barrier.
    decided = broadcast_object(ranks, status if ranks.is_main else None)
    for outcome in (decided, status):
        if isinstance(outcome, BaseException):
            raise outcome
    group = open_group(out, mode="r+", storage_options=settings.storage_options)
    result = {"tokens": 0, "bytes": 0, "units": 0, "energy": None}
    # Every rank splits the same pending list: rank 0's view, read before any unit of this run
    # commits (a rank reading later would see another set and deal the units differently).
    committed_before = broadcast_object(ranks, committed_units(group) if ranks.is_main else None)
    if ranks.is_leader:
        check_resume(group, plan.fingerprint, where)
        pending = [u.index for u in plan.units if not committed_before[u.index]]
        result = _run_units(scope, plan, group, ranks.my_units(pending), settings, on_progress, ranks)
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
            return load(model, device=device or f"cuda:{devices[0]}")
        memory = {i: torch.cuda.get_device_properties(i).total_memory for i in devices}
        return load(model, device_map="balanced", max_memory=memory)
    return load(model, device=device)


def _prepare_store(out, plan: StorePlan, scope, prompt_list: list[Prompt], settings: DumpSettings,
                   where: str, provenance: dict) -> None:
    """Create the store, or check it for resume. A store never fully laid out is recreated; a path
    holding anything else is refused, and nothing there is deleted."""
    try:
        existing = open_group(out, mode="r", storage_options=settings.storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        existing = None
    if existing is not None and not is_dump_group(existing):
        raise foreign_files_error(where)
    if existing is not None and store_is_complete(existing):
        if not settings.resume:
            raise existing_store_error(where)
        check_resume(existing, plan.fingerprint, where)
        return
    mode = "w" if existing is not None else "w-"      # "w-" refuses a path that holds anything
    try:
        group = open_group(out, mode=mode, storage_options=settings.storage_options)
    except FileExistsError:                           # files there, but no zarr group: not ours
        raise foreign_files_error(where) from None
    create_store(group, plan, [p.text for p in prompt_list], [p.metadata for p in prompt_list],
                 _vocab(scope.tokenizer), provenance, settings.compress)


def _vocab(tokenizer) -> list[str]:
    """Decoded string of each token id, so readers decode without the tokenizer."""
    ids = [[i] for i in range(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)   # fast tokenizers: 50k ids in ~0.1 s
    if backend is not None:
        return backend.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids)


def _provenance(scope, plan: StorePlan, truncated: int, settings: DumpSettings) -> dict:
    """The shared provenance record (`microscope.provenance`) plus what the store was made with."""
    tok = scope.tokenizer
    info = getattr(scope, "info", None)
    return {
        **provenance(scope, seed=settings.seed, command=settings.command_line),
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
        "code_version": __version__,
        "seeds": {"dump": settings.seed, "random_models": RANDOM_SEED},
    }


def _run_units(scope, plan: StorePlan, group: zarr.Group, unit_indices: list[int], settings: DumpSettings,
               on_progress, ranks: Ranks) -> dict:
    """Forward every batch of the given units, handing each finished unit to the background writer."""
    writer = BackgroundWriter(group, plan, settings.max_pending_bytes, settings.writer_threads)
    pool = BufferPool(pin=scope.device.type == "cuda")
    tokens = 0
    total = sum(len(plan.prompt_tokens[p]) for i in unit_indices for p in plan.units[i].prompts)
    devices = ranks.replica_devices() if torch.cuda.is_available() else None

    def progress(batch_tokens: int = 0) -> None:
        nonlocal tokens
        tokens += batch_tokens
        if on_progress is not None:
            on_progress({"tokens": tokens, "total": total, "bytes": writer.bytes_written,
                         "units": writer.units_committed})

    try:
        with EnergyMeter(devices) as meter:
            for staging in capture_units(scope, plan, unit_indices, settings.batch_tokens, pool, progress):
                writer.submit(staging)
            writer.close()
    except BaseException:
        writer.abort()
        raise
    progress()
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
