"""`microscope organism ...`: train the model organism and measure its ground truth."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import typer

import microscope.models.organism as organism
from microscope.cli.errors import OptionError

organism_app = typer.Typer(help="The built-in model organism: a tiny OPT with planted failure modes.",
                           no_args_is_help=True)

ORGANISM_DIR = Path(organism.__file__).parent


@organism_app.command("train")
def train_command(
    steps: int = typer.Option(None, help="Training steps (default: the shipped organism's)."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the corpus stream."),
    batch_size: int = typer.Option(None, help="Sequences per step (default: the shipped organism's)."),
    version: int = typer.Option(2, help="2: the word-level organism; 3: the BPE organism that speaks "
                                        "OPT's language (English, the OPT paper's formats)."),
    post_ln: bool = typer.Option(False, help="OPT-350m's layout: LayerNorm after each residual add."),
    embed_proj_dim: int = typer.Option(None, help="word_embed_proj_dim below d_model (adds "
                                                  "project_in/project_out, as OPT-350m)."),
    checkpoint: Path = typer.Option(None, help="Save the run's state here every 500 steps and resume "
                                               "from it when it exists (same arguments)."),
    out: Path = typer.Option(None, help="HF folder to write (replaced atomically; default: the "
                                        "shipped weights folder of VERSION)."),
    evaluate: bool = typer.Option(True, help="Measure the ground truth; write ground_truth.json and "
                                             "MODEL_CARD.md beside OUT."),
) -> None:
    """Train the organism from scratch (deterministic), save it, and measure its ground truth."""
    from microscope.models.organism.train import TrainConfig, save_organism, train

    if version not in (2, 3):
        raise OptionError(f"--version {version} is not an organism; choose 2 or 3")
    if version == 3:
        from microscope.models.organism_v3.train import V3_CONFIG, train_v3
        base, default_out = V3_CONFIG, ORGANISM_DIR.parent / "organism_v3" / "weights"
    else:
        base, default_out = TrainConfig(), ORGANISM_DIR / "weights"
    config = replace(base, seed=seed, post_ln=post_ln, embed_proj_dim=embed_proj_dim,
                     steps=base.steps if steps is None else steps,
                     batch_size=base.batch_size if batch_size is None else batch_size)
    if config.steps < 1:
        raise OptionError("--steps must be at least 1")
    if embed_proj_dim is not None and not 0 < embed_proj_dim < config.d_model:
        raise OptionError(f"--embed-proj-dim must be between 1 and d_model - 1 ({config.d_model - 1})")
    def log_line(step: int, loss: float, model) -> None:  # a batch job's log has no progress bar
        if not sys.stdout.isatty() and step % 500 == 0:
            typer.echo(f"step {step}/{config.steps} loss {loss:.3f}")

    if version == 3:
        model, tokenizer, log = train_v3(config, checkpoint=checkpoint, on_log=log_line)
    else:
        model, tokenizer, log = train(config, checkpoint=checkpoint, on_log=log_line)
    folder = save_organism(model, tokenizer, out or default_out)
    typer.echo(f"trained {config.steps} steps in {log['seconds']:.0f} s; saved to {folder}")
    (folder.parent / "training_log.json").write_text(json.dumps(log, indent=1))
    if evaluate and version == 2:
        from microscope.models.organism.card import write_card
        from microscope.models.organism.evaluate import load_organism, measure

        truth = measure(*load_organism(folder))
        (folder.parent / "ground_truth.json").write_text(json.dumps(truth, indent=1))
        write_card(truth, log, folder.parent / "MODEL_CARD.md")
        typer.echo(f"ground truth and model card written beside {folder}")
    elif evaluate:
        from microscope.models.organism_v3.card import write_card
        from microscope.models.organism_v3.evaluate import load_organism, measure

        write_card(measure(*load_organism(folder)), log, folder.parent)
        typer.echo(f"ground truth and model card written beside {folder}")


@organism_app.command("evaluate")
def evaluate_command(
    version: int = typer.Option(2, help="Organism version whose ground-truth measures to run: 2 or 3."),
    folder: Path = typer.Option(None, help="HF folder of an organism (default: the shipped weights of VERSION)."),
) -> None:
    """Re-measure the ground truth of an organism folder and print it as JSON."""
    if version not in (2, 3):
        raise OptionError(f"--version {version} is not an organism; choose 2 or 3")
    if version == 3:
        from microscope.models.organism_v3.evaluate import load_organism, measure
    else:
        from microscope.models.organism.evaluate import load_organism, measure
    folder = folder or (ORGANISM_DIR.parent / ("organism_v3" if version == 3 else "organism") / "weights")
    if not (folder / "config.json").exists():
        raise OptionError(f"--folder {folder} has no config.json; train one with `microscope organism train`")
    typer.echo(json.dumps(measure(*load_organism(folder)), indent=1))
