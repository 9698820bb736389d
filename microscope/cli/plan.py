"""`microscope plan` and `microscope convert-metaseq`: the scale commands (heavy imports deferred,
so that `microscope --help` stays fast)."""

from __future__ import annotations

from pathlib import Path

import typer

from microscope.cli.errors import OptionError
from microscope.names import every_layer


def plan_command(
    model: str = typer.Option("opt-66b", help="Family size: opt-125m ... opt-175b ('opt-' optional)."),
    hooks: str = typer.Option(every_layer("resid_post"), help="Comma-separated hook names or glob patterns."),
    tokens: str = typer.Option("10M", help="Prompt tokens to push through the model (10M, 2.5B, ...)."),
    dtype: str = typer.Option("fp16", help="Store dtype: fp16, bf16, fp32."),
    positions: str = typer.Option("all", help="Store every position ('all') or each prompt's last ('last')."),
    model_dtype: str = typer.Option("fp16", help="Dtype of the weights on the GPU: fp32, fp16, bf16, int8."),
    seq_len: int = typer.Option(2048, help="Tokens per prompt."),
    batch_size: int = typer.Option(8, help="Prompts per forward pass."),
    gpu_memory: str = typer.Option("80GB", help="Memory of one GPU (80GB, 141GB, 24GiB)."),
    throughput: float = typer.Option(None, help="Measured tokens/s of one replica (default: estimated from FLOPs)."),
    gpu_tflops: float = typer.Option(125.0, help="Achieved TFLOP/s per GPU, for the estimate."),
    write_gbps: float = typer.Option(1.3, help="Durable write bandwidth of the store's file system, GB/s."),
    replicas: int = typer.Option(1, help="Data-parallel model replicas."),
    gpu_power_w: float = typer.Option(400.0, help="Board power of one GPU, W."),
    pue: float = typer.Option(1.1, help="Data-centre power usage effectiveness."),
    grid_intensity: float = typer.Option(429.0, help="Grid carbon intensity, gCO2e/kWh."),
    all_sizes: bool = typer.Option(False, "--all", help="Budget every family size (a table)."),
    markdown: bool = typer.Option(False, help="Print a Markdown table (as in docs/scale.md)."),
) -> None:
    """A dump's budget, before running it: GPU memory per replica, GPUs, store size, time, energy, CO2e."""
    from rich.console import Console
    from rich.table import Table

    from microscope.activations import budget

    inputs = dict(hooks=hooks, tokens=budget.parse_count(tokens), dtype=dtype, positions=positions,
                  model_dtype=model_dtype, seq_len=seq_len, batch_size=batch_size,
                  gpu_memory_gb=gpu_memory_gb(gpu_memory), throughput=throughput,
                  gpu_tflops=gpu_tflops, write_gbps=write_gbps, replicas=replicas, gpu_power_w=gpu_power_w,
                  pue=pue, grid_intensity=grid_intensity)
    budgets = budget.estimate_every_size(**inputs) if all_sizes else [budget.estimate_budget(model, **inputs)]
    if markdown:
        typer.echo(budget.markdown_table(budgets))
        return
    console = Console()
    if all_sizes:
        table = Table(*budget.TABLE_COLUMNS, title=f"dump budget: {hooks}, {tokens} tokens")
        for row in budget.table_rows(budgets):
            table.add_row(*row)
        console.print(table)
        return
    table = Table(show_header=False, title=f"dump budget for {budgets[0].size}")
    for label, value in budget.describe(budgets[0]):
        table.add_row(label, value)
    console.print(table)


def gpu_memory_gb(text: str) -> float:
    """A --gpu-memory size ("80GB", "141GB", "24GiB") in GB of 1e9 bytes."""
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(text) / 1e9
    except ValueError:  # accelerate's size parser
        raise OptionError(f"--gpu-memory {text!r} is not a size: write e.g. 80GB, 141GB or 24GiB") from None


def convert_metaseq_command(
    source: Path = typer.Argument(..., help="Folder of *model_part-<i>.pt files, or one consolidated .pt file."),
    out: Path = typer.Argument(..., help="HF folder to write (config.json + safetensors shards)."),
    heads: int = typer.Option(None, help="Attention heads (default: that of the OPT size of the same shape)."),
    dtype: str = typer.Option(None, help="Cast weights to float16, bfloat16 or float32 (default: keep)."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard (bounds memory too)."),
) -> None:
    """Convert a metaseq checkpoint (OPT-175B's release format) into HF safetensors."""
    import torch

    from microscope.models.metaseq import convert_metaseq

    torch_dtype = None
    if dtype is not None:
        if dtype not in ("float16", "bfloat16", "float32"):
            raise OptionError("--dtype must be float16, bfloat16 or float32")
        torch_dtype = getattr(torch, dtype)
    report = convert_metaseq(source, out, heads=heads, dtype=torch_dtype, max_shard_size=max_shard_size)
    c = report.config
    typer.echo(f"converted {len(report.parts)} model-parallel part(s) -> {report.out}: {c.num_hidden_layers} layers, "
               f"d_model {c.hidden_size}, {c.num_attention_heads} heads, {report.total_bytes / 1e9:.2f} GB in "
               f"{len(report.shard_files)} shard(s)")
    for note in report.notes:
        typer.echo(f"note: {note}")
