"""Planning a dump before any forward pass: tokenise every prompt, choose the kept positions, probe
every hook's shape with one short forward, and pack the prompts into work units.

    plan, truncated = make_plan(scope, load_prompts("demo"), "blocks.*.hook_resid_post", DumpSettings())

The `StorePlan` it returns fixes every offset, array shape and unit of the store (`schema.py`) and
the fingerprint a resume must match.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from microscope.activations.layout import default_chunk_rows, store_dtype
from microscope.activations.schema import StorePlan, StoredHook, pattern_rows
from microscope.activations.settings import DumpSettings, StoredPositions
from microscope.activations.units import plan_units
from microscope.errors import PromptError, StoreError
from microscope.names import is_pattern, split_patterns
from microscope.prompts import Prompt, prompts_hash


def make_plan(scope, prompt_list: list[Prompt], hooks: str | Sequence[str],
              settings: DumpSettings = DumpSettings()) -> tuple[StorePlan, int]:
    """The tokenisation pass: token ids, kept positions, hook shapes, units. Returns (plan, truncated).

    Uses the settings that shape the store: dtype, positions, max_length, pattern_heads,
    chunk_rows, unit_rows, compress."""
    names = resolve_hooks(scope, hooks)
    tokens, truncated = tokenize_prompts(scope, prompt_list, settings.max_length)
    kept, positions_key = kept_positions(settings.positions, tokens, prompt_list)
    specs = probe_hooks(scope, names, tokens[0], settings.pattern_heads)
    store = store_dtype(settings.dtype)
    widest = max(h.width for h in specs if not h.is_pattern) if any(not h.is_pattern for h in specs) else 1
    chunk_rows = settings.chunk_rows or default_chunk_rows(widest * store.itemsize)
    unit_rows = settings.unit_rows or chunk_rows
    kept_counts = np.array([len(k) for k in kept], np.int64)
    pattern_counts = (np.array([pattern_rows(k) for k in kept], np.int64) if any(h.is_pattern for h in specs)
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
        "pattern_heads": list(settings.pattern_heads) if settings.pattern_heads is not None else None,
        "prompts_hash": prompts_hash(prompt_list), "tokens_hash": "sha256:" + token_digest.hexdigest(),
        "max_length": settings.max_length, "chunk_rows": chunk_rows, "unit_rows": unit_rows,
        "pattern_chunk_rows": pattern_chunk_rows, "compress": settings.compress or "none"}
    plan = StorePlan(specs, store, tokens, kept, units, chunk_rows, pattern_chunk_rows, fingerprint)
    return plan, truncated


def resolve_hooks(scope, hooks: str | Sequence[str]) -> list[str]:
    """The hook names `hooks` (names or globs) select in `scope`, in model order; at least one."""
    names = scope.resolve_names(split_patterns(hooks))
    if not names:
        raise StoreError(f"--hooks {hooks!r} selects no hook")
    return names


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


def kept_positions(positions: StoredPositions, tokens: list[np.ndarray],
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
                pattern_heads: Sequence[int] | None) -> list[StoredHook]:
    """Feature shapes of every hook, from one short forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(activation, hook):
        shapes[hook.name] = tuple(activation.shape)

    ids = torch.from_numpy(first_prompt[:2].astype(np.int64))[None]
    with torch.inference_mode(), scope.hooks({n: record for n in names}):
        scope.model(input_ids=ids.to(scope.device), attention_mask=torch.ones_like(ids).to(scope.device))
    specs = []
    for name in names:
        shape = shapes[name]
        if is_pattern(name):
            specs.append(StoredHook(name, (shape[1],), kept_heads(pattern_heads, shape[1], name)))
        else:
            specs.append(StoredHook(name, shape[2:]))
    return specs


def kept_heads(pattern_heads: Sequence[int] | None, n_heads: int, name: str) -> tuple[int, ...]:
    """The heads the attention pattern `name` keeps: all of its `n_heads` when None."""
    heads = tuple(range(n_heads)) if pattern_heads is None else tuple(pattern_heads)
    if any(not 0 <= h < n_heads for h in heads):
        raise StoreError(f"--pattern-heads {list(heads)}: {name} has heads 0..{n_heads - 1}")
    return heads

