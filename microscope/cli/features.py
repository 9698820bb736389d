"""`microscope features ...`: train a dictionary from a store, and write its dashboards.

Heavy imports are deferred so that `--help` stays fast; errors are reported by `microscope.cli.errors`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from microscope.cli.errors import OptionError
from microscope.cli.invocation import command_line

features_app = typer.Typer(help="Sparse dictionaries (SAEs, transcoders) trained from activation stores.",
                           no_args_is_help=True)


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise OptionError(f"--storage-options must be a JSON object, e.g. "
                          f"'{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}' ({err})") from None
    if not isinstance(options, dict):
        raise OptionError("--storage-options must be a JSON object")
    return options


@features_app.command("train")
def train_command(
    store: str = typer.Argument(..., help="The activation store: a folder or an fsspec URL (s3://...)."),
    hook: str = typer.Option(..., help="The hook to encode, e.g. blocks.1.hook_resid_post."),
    out: Path = typer.Option(..., help="Folder of the dictionary (sparsify's cfg.json + sae.safetensors, "
                                       "provenance.json, checkpoint.pt)."),
    transcode_to: str = typer.Option(None, help="Train a transcoder predicting this hook (e.g. "
                                                "blocks.1.hook_mlp_out from blocks.1.hook_resid_mid)."),
    steps: int = typer.Option(1000, help="Optimiser steps."),
    batch_size: int = typer.Option(1024, help="Tokens per step and rank."),
    k: int = typer.Option(16, help="Active latents per token (TopK)."),
    expansion_factor: int = typer.Option(8, help="Latents per input dimension."),
    lr: float = typer.Option(None, help="Learning rate (default: sparsify's 2e-4 / sqrt(latents / 2^14))."),
    dead_tokens: int = typer.Option(1_000_000, help="A latent silent for this many tokens is dead (AuxK)."),
    checkpoint_every: int = typer.Option(100, help="Steps between checkpoints."),
    seed: int = typer.Option(0, help="Initialisation and batch-order seed."),
    resume: bool = typer.Option(True, help="Continue from OUT/checkpoint.pt when it is there."),
    storage_options: str = typer.Option(None, help="fsspec options of a URL store, as JSON."),
    progress: bool = typer.Option(True, help="Show a progress bar (tokens/s, FVU, dead share)."),
) -> None:
    """Train a TopK SAE (or transcoder) on a hook of a store; resumable; data parallel under torchrun."""
    from microscope.analysis.features.train import train_dictionary
    from microscope.workbench.progress import step_progress

    for name, value in {"--steps": steps, "--batch-size": batch_size, "--k": k,
                        "--expansion-factor": expansion_factor, "--checkpoint-every": checkpoint_every}.items():
        if value < 1:
            raise OptionError(f"{name} must be at least 1, got {value}")
    with step_progress("features train", enabled=progress and int(os.environ.get("RANK", "0")) == 0) as bar:
        d = train_dictionary(store, hook, out, transcode_to=transcode_to, resume=resume, progress=bar,
                             storage_options=_storage_options(storage_options), steps=steps, batch_size=batch_size,
                             k=k, expansion_factor=expansion_factor, lr=lr, dead_tokens=dead_tokens,
                             checkpoint_every=checkpoint_every, seed=seed, command_line=command_line())
    history = d.provenance.get("history") or [{}]
    typer.echo(f"{d!r} -> {out} (FVU {history[-1].get('fvu', float('nan')):.4f} at step "
               f"{d.provenance.get('steps_done')})")


@features_app.command("dashboards")
def dashboards_command(
    dictionary: Path = typer.Argument(..., help="A dictionary folder written by `microscope features train`."),
    store: str = typer.Argument(..., help="The store to read (usually the one it was trained on)."),
    out: Path = typer.Option(..., help="HTML file to write (a searchable list of latents)."),
    model: str = typer.Option(None, help="Model for the promoted/suppressed tokens (any `load` source); "
                                         "default: the store's model."),
    latents: int = typer.Option(200, help="Panels shown: the most frequently firing latents."),
    storage_options: str = typer.Option(None, help="fsspec options of a URL store, as JSON."),
) -> None:
    """Write the feature dashboards of a dictionary over a store as one HTML page."""
    import microscope
    from microscope.analysis.features import feature_dashboards, load_dictionary

    d = load_dictionary(dictionary)
    opened = microscope.open_store(store, storage_options=_storage_options(storage_options))
    scope = microscope.load(model or opened.settings["model"])
    dash = feature_dashboards(d, opened, scope=scope)
    order = sorted(range(d.n_latents), key=lambda i: -float(dash.density[i]))[:latents]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{d!r}</title></head><body>"
                   f"<h1>{d!r}</h1>{dash.to_html(order)}</body></html>\n", encoding="utf-8")
    typer.echo(f"{len(order)} latent panels -> {out}")
