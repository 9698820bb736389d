"""`microscope dump` and `microscope inspect` (heavy imports deferred so `--help` stays fast).

The dump's options become one `DumpSettings`; errors are reported by `microscope.cli.errors`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import typer

from microscope.cli.errors import OptionError
from microscope.cli.invocation import command_line


def dump_command(
    model: str = typer.Option(..., help="'organism', a hub id (local cache), a folder, or 'random:opt-125m'."),
    prompts: str = typer.Option(..., help="A .txt (one per line) or .jsonl ('text' field) file, or a built-in set name."),
    hooks: str = typer.Option(..., help="Comma-separated hook names or glob patterns, e.g. 'blocks.*.hook_resid_post'."),
    out: str = typer.Option(..., help="Store path: a folder or any fsspec URL (s3://bucket/run.zarr)."),
    dtype: str = typer.Option("fp16", help="Stored dtype: fp32, fp16 or bf16 (bf16 is stored as its uint16 bits)."),
    positions: str = typer.Option("all", help="Tokens kept per prompt: all, last, or field:NAME (a .jsonl field "
                                              "listing positions or a 0/1 mask)."),
    batch_tokens: int = typer.Option(4096, help="Padded tokens per forward batch (batches never cross a work unit)."),
    max_length: int = typer.Option(None, help="Truncate prompts to their first N tokens (else a prompt longer "
                                              "than the model's context is an error)."),
    resume: bool = typer.Option(False, help="Continue an existing store: recompute only uncommitted units."),
    pattern_heads: str = typer.Option(None, help="Heads kept for attention patterns, e.g. '0,3' (default all)."),
    chunk_rows: int = typer.Option(None, help="Rows per chunk (default: about 16 MiB for the widest hook)."),
    unit_rows: int = typer.Option(None, help="Tokens per work unit, a multiple of chunk_rows (default one chunk)."),
    compress: str = typer.Option("none", help="Chunk compression: none or zstd (crc32c checksums always)."),
    gpus_per_model: int = typer.Option(1, help="Under torchrun: ranks (GPUs) per model replica."),
    max_pending_mb: int = typer.Option(1024, help="Memory bound of activations waiting to be written, MB."),
    writer_threads: int = typer.Option(2, help="Background writer threads."),
    seed: int = typer.Option(0, help="Seed recorded in the store and set before the run."),
) -> None:
    """Capture activations of every prompt into a Zarr store (resumable; multi-rank under torchrun)."""
    from rich.console import Console

    from microscope.activations.dump import dump
    from microscope.activations.settings import DumpSettings
    from microscope.workbench.progress import step_progress

    rank = int(os.environ.get("RANK", "0"))
    settings = DumpSettings(
        dtype=dtype, positions=positions, batch_tokens=batch_tokens, max_length=max_length, resume=resume,
        pattern_heads=_head_list(pattern_heads) if pattern_heads else None,
        chunk_rows=chunk_rows, unit_rows=unit_rows, compress=compress, gpus_per_model=gpus_per_model,
        max_pending_bytes=max_pending_mb << 20, writer_threads=writer_threads, seed=seed,
        command_line=command_line())
    with step_progress("dump", enabled=rank == 0) as bar:
        summary = dump(model, prompts, hooks, out, settings, on_progress=_with_rates(bar))
    if rank == 0:
        Console().print(_summary_table(summary))


def _head_list(text: str) -> list[int]:
    """--pattern-heads '0,3' as [0, 3]."""
    try:
        return [int(h) for h in text.split(",")]
    except ValueError:
        raise OptionError(f"--pattern-heads {text!r}: give head indices separated by commas, e.g. '0,3'") from None


def _with_rates(bar: Callable[[str, int, int], None]) -> Callable[[dict], None]:
    """The dump's on_progress state reported to `bar` as tokens done of all, with tokens/s and
    MB/s since the first batch."""
    started = None

    def report(state: dict) -> None:
        nonlocal started
        started = started or time.perf_counter()
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar(f"tokens, {state['tokens'] / elapsed:,.0f} tok/s, {state['bytes'] / 1e6 / elapsed:,.1f} MB/s",
            state["tokens"], state["total"])

    return report


def _summary_table(summary):
    from rich.table import Table

    table = Table(title="dump summary", show_header=False)
    energy = f"{summary.energy_joules:,.0f} J" if summary.energy_joules is not None else "not measured (no NVML GPU)"
    rows = [("store", summary.out), ("model", summary.model), ("hooks", f"{len(summary.hooks)}"),
            ("dtype", summary.dtype), ("prompts", f"{summary.n_prompts:,}"),
            ("tokens stored", f"{summary.n_tokens:,}"),
            ("truncated prompts", f"{summary.truncated_prompts:,}"),
            ("units", f"{summary.units_run} run, {summary.units_already_committed} already committed, "
                      f"{summary.units_total} total"),
            ("written", f"{summary.bytes_written / 1e6:,.1f} MB"), ("time", f"{summary.seconds:,.1f} s"),
            ("tokens/s", f"{summary.tokens_per_s:,.0f}"), ("MB/s", f"{summary.mb_per_s:,.1f}"),
            ("energy", energy), ("ranks", f"{summary.world_size}")]
    for key, value in rows:
        table.add_row(key, value)
    return table


def inspect_command(
    store: str = typer.Argument(..., help="Store path or fsspec URL."),
    verify: bool = typer.Option(False, help="Read every chunk and check its crc32c checksum."),
) -> None:
    """Show a store's provenance, units and hooks (and verify its checksums)."""
    from rich.console import Console
    from rich.table import Table

    from microscope.activations.reader import open_store

    console = Console()
    opened = open_store(store)
    prov = opened.provenance
    done = opened.committed
    info = Table(title=f"activation store {store}", show_header=False)
    for key, value in [("model", prov.get("model")), ("weights hash", prov.get("weights_hash")),
                       ("dtype", opened.dtype.name), ("positions", prov.get("positions")),
                       ("prompts", f"{opened.n_prompts:,}"), ("tokens", f"{opened.n_tokens:,}"),
                       ("units committed", f"{int(done.sum())} / {len(done)}"),
                       ("energy", f"{prov['energy_joules']:,.0f} J" if "energy_joules" in prov else "not measured"),
                       ("code version", prov.get("code_version")), ("command", prov.get("command")),
                       ("created", prov.get("created"))]:
        info.add_row(key, str(value))
    console.print(info)
    hooks = Table(title="hooks")
    for column in ("hook", "shape", "dtype"):
        hooks.add_column(column)
    for name, shape, dtype in opened._summary_rows():
        hooks.add_row(name, f"[{shape}]", dtype)
    console.print(hooks)
    if verify:
        problems = opened.verify()
        for line in problems:
            console.print(f"[red]{line}[/red]")
        console.print("[green]all checksums match[/green]" if not problems else f"{len(problems)} corrupted chunks")
        if problems:
            raise typer.Exit(2)
