"""`DumpSettings`: how a dump runs, one object carried from the CLI (or a Python call) to the
forward loop. What it captures (model, prompts, hooks, store) are `dump`'s own arguments.

    settings = DumpSettings(dtype="bf16", positions="last", resume=True)
    dump("organism", "demo", "blocks.*.hook_resid_post", "activations/demo.zarr", settings)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

from microscope.errors import UnknownSettingError

# "all", "last", "field:NAME" (a prompt metadata field listing positions or a 0/1 mask), or one
# list of positions (or a 0/1 mask) per prompt.
StoredPositions = str | Sequence[Sequence[int]]


@dataclass(frozen=True)
class DumpSettings:
    """Every setting of a dump; the defaults are the CLI's. Sizes in rows (tokens) or bytes."""

    dtype: str = "fp16"                         # stored dtype: fp32, fp16 or bf16
    positions: StoredPositions = "all"          # tokens kept per prompt (see `StoredPositions`)
    batch_tokens: int = 4096                    # padded tokens per forward batch
    max_length: int | None = None               # truncate prompts to their first N tokens
    resume: bool = False                        # continue a store: recompute uncommitted units only
    pattern_heads: Sequence[int] | None = None  # heads kept for attention patterns (None: all)
    chunk_rows: int | None = None               # rows per chunk (None: about 8 MiB of the widest hook)
    unit_rows: int | None = None                # tokens per work unit, a multiple of chunk_rows
    compress: str | None = None                 # none or zstd (crc32c checksums always)
    storage_options: dict | None = None         # fsspec options of a URL store (s3 endpoint, ...)
    device: str | None = None                   # where a model loaded from a source runs
    gpus_per_model: int = 1                     # under torchrun: ranks (GPUs) per model replica
    max_pending_bytes: int = 1 << 30            # bound of staged bytes waiting to be written
    writer_threads: int = 2                     # background writer threads
    seed: int = 0                               # recorded in the store and set before the run
    command_line: str | None = None             # recorded in the store's provenance

    def but(self, **changes) -> DumpSettings:
        """A copy with `changes`; an unknown name is an `UnknownSettingError` listing the settings."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise UnknownSettingError(f"unknown dump setting(s) {', '.join(unknown)}; the settings are "
                                      f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)


def takes_settings(fn: Callable) -> Callable:
    """Give `fn(..., settings=None, **options)` a signature listing every `DumpSettings` field as a
    keyword (for help(), editors and callers that inspect it), so the field list is written once."""
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(DumpSettings)]
    fn.__signature__ = signature.replace(parameters=params)
    return fn
