"""`microscope graph ...`: transcoders for every MLP from one store, and one prompt's attribution graph.

Heavy imports are deferred so that `--help` stays fast; errors are reported by `microscope.cli.errors`."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from microscope.cli.errors import OptionError
from microscope.cli.invocation import command_line

graph_app = typer.Typer(help="Attribution graphs: transcoders for every MLP, replacement model, pruned graph "
                             "(circuit-tracer's JSON).", no_args_is_help=True)


@graph_app.command("transcoders")
def transcoders_command(
    store: str = typer.Argument(..., help="A store holding every block's hook_resid_mid and hook_mlp_out."),
    out: Path = typer.Option(..., help="Folder of the transcoders (one sub-folder layer_<l> per block)."),
    steps: int = typer.Option(1000, help="Optimiser steps per transcoder."),
    batch_size: int = typer.Option(512, help="Tokens per step."),
    k: int = typer.Option(32, help="Active latents per token (TopK)."),
    expansion_factor: int = typer.Option(8, help="Latents per input dimension."),
    dead_tokens: int = typer.Option(20_000, help="A latent silent for this many tokens is dead (AuxK)."),
    seed: int = typer.Option(0, help="Initialisation and batch-order seed."),
    resume: bool = typer.Option(True, help="Load finished blocks and continue interrupted ones."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train one transcoder per MLP (hook_resid_mid -> hook_mlp_out) from one store, every block."""
    from microscope.analysis.graphs.transcoders import train_transcoders
    from microscope.workbench.progress import step_progress

    for name, value in {"--steps": steps, "--batch-size": batch_size, "--k": k,
                        "--expansion-factor": expansion_factor}.items():
        if value < 1:
            raise OptionError(f"{name} must be at least 1, got {value}")
    with step_progress("graph transcoders", enabled=progress and int(os.environ.get("RANK", "0")) == 0) as bar:
        tcs = train_transcoders(store, out, resume=resume, progress=bar, command_line=command_line(), steps=steps,
                                batch_size=batch_size, k=k, expansion_factor=expansion_factor,
                                dead_tokens=dead_tokens, checkpoint_every=min(100, steps), seed=seed)
    fvu = [d.provenance.get("history", [{}])[-1].get("fvu", float("nan")) for d in tcs.by_layer]
    typer.echo(f"{len(tcs)} transcoders -> {out} (FVU by block: {', '.join(f'{v:.3f}' for v in fvu)})")


@graph_app.command("attribute")
def attribute_command(
    prompt: str = typer.Argument(..., help="The prompt (one text)."),
    transcoders: Path = typer.Option(..., help="A folder written by `microscope graph transcoders`."),
    model: str = typer.Option("organism", help="Any `load` source."),
    target: list[str] = typer.Option(None, help="A target word (repeat the option); each by its first token. "
                                                "Default: the most probable next tokens."),
    out: Path = typer.Option(Path("results/graphs"), help="Folder of <slug>.json and graph-metadata.json."),
    slug: str = typer.Option("graph", help="The graph's name in circuit-tracer's frontend."),
    node_threshold: float = typer.Option(0.8, help="Share of influence the kept nodes hold."),
    edge_threshold: float = typer.Option(0.98, help="Share of influence the kept edges hold."),
    store: str = typer.Option(None, help="The transcoders' store, for feature labels from its dashboards."),
    html: Path = typer.Option(None, help="Also write the pruned graph as one offline plotly HTML page."),
) -> None:
    """Write one prompt's pruned attribution graph as circuit-tracer's JSON and print its scores."""
    import microscope
    from microscope.analysis.graphs import attribute, graph_scores, load_transcoders, prune, write_graph_files
    from microscope.analysis.graphs.labels import feature_labels
    from microscope.analysis.graphs.replacement import ReplacementModel
    from microscope.analysis.graphs.result import GraphResult
    from microscope.analysis.inputs import word_class_ids

    scope = microscope.load(model)
    tcs = load_transcoders(transcoders)
    targets = word_class_ids(scope, target, parameter="--target") if target else None
    graph = attribute(ReplacementModel(scope, tcs, prompt), targets)
    pruned = prune(graph, node_threshold, edge_threshold)
    labels = {}
    if store is not None:
        kept = pruned.node_mask[:graph.n_features].nonzero()[:, 0]
        labels = feature_labels(tcs, microscope.open_store(store),
                                [(int(graph.features[i, 0]), int(graph.features[i, 2])) for i in kept], scope=scope)
    path = write_graph_files(graph, pruned, out, slug=slug, labels=labels)
    replacement, completeness = graph_scores(graph)
    if html is not None:
        result = GraphResult(graph, pruned, replacement, completeness, labels=labels)
        html.parent.mkdir(parents=True, exist_ok=True)
        result.figures()[0].write_html(html, include_plotlyjs=True)
    typer.echo(f"{int(pruned.node_mask.sum())} nodes, {int(pruned.edge_mask.sum())} edges -> {path}; "
               f"replacement score {replacement:.3f}, completeness {completeness:.3f}")
