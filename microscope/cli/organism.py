"""`microscope organism ...`: train the model organism and measure its ground truth."""

from __future__ import annotations

import json
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
    out: Path = typer.Option(ORGANISM_DIR / "weights", help="HF folder to write (replaced atomically)."),
    evaluate: bool = typer.Option(True, help="Measure the ground truth; write ground_truth.json and "
                                             "MODEL_CARD.md beside OUT."),
) -> None:
    """Train the organism from scratch (deterministic), save it, and measure its ground truth."""
    from microscope.models.organism.card import write_card
    from microscope.models.organism.evaluate import load_organism, measure
    from microscope.models.organism.train import TrainConfig, save_organism, train

    config = TrainConfig(seed=seed) if steps is None else TrainConfig(seed=seed, steps=steps)
    if batch_size is not None:
        config.batch_size = batch_size
    if config.steps < 1:
        raise OptionError("--steps must be at least 1")
    model, tokenizer, log = train(config)
    folder = save_organism(model, tokenizer, out)
    typer.echo(f"trained {config.steps} steps in {log['seconds']:.0f} s; saved to {folder}")
    (folder.parent / "training_log.json").write_text(json.dumps(log, indent=1))
    if evaluate:
        truth = measure(*load_organism(folder))
        (folder.parent / "ground_truth.json").write_text(json.dumps(truth, indent=1))
        write_card(truth, log, folder.parent / "MODEL_CARD.md")
        typer.echo(f"ground truth and model card written beside {folder}")


@organism_app.command("evaluate")
def evaluate_command(
    folder: Path = typer.Option(ORGANISM_DIR / "weights", help="HF folder of an organism."),
) -> None:
    """Re-measure the ground truth of an organism folder and print it as JSON."""
    from microscope.models.organism.evaluate import load_organism, measure

    if not (folder / "config.json").exists():
        raise OptionError(f"--folder {folder} has no config.json; train one with `microscope organism train`")
    typer.echo(json.dumps(measure(*load_organism(folder)), indent=1))
