"""Deterministic training of a model organism: a tiny ``OPTForCausalLM`` on a synthetic corpus.

    from microscope.models.organism.train import TrainConfig, train, save_organism
    model, tokenizer, log = train(TrainConfig(steps=200))
    save_organism(model, tokenizer, "weights")      # HF folder, written atomically

By default the tokenizer and batches are organism v2's (word-level); organism v3 passes its own
BPE tokenizer and token batches. ``post_ln`` and ``embed_proj_dim`` give OPT-350m's layout
(post-LN, ``project_in``/``project_out``).

Determinism: python, numpy and torch seeds fixed, ``torch.use_deterministic_algorithms(True)``,
a fixed thread count, and the corpus stream seeded; the same config on the same machine and
torch build gives bit-identical weights. With ``checkpoint`` a run saves its state every
``checkpoint_every`` steps and, restarted with the same arguments, resumes from it (the batch
stream is replayed up to the saved step, so the resumed run sees the batches it would have).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from microscope.errors import TrainingError
from microscope.models.organism.corpus import Corpus, CorpusConfig
from microscope.models.organism.tokenizer import build_tokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class TrainConfig:
    """Model shape, optimiser and run length. Defaults are the shipped organism's."""

    seed: int = 0
    steps: int = 8000
    batch_size: int = 32
    seq_len: int = 128
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    ffn_dim: int = 512
    lr: float = 2e-3
    warmup: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1          # as OPT was trained
    grad_clip: float = 1.0
    threads: int = 1                   # one thread: the 2-core machine is shared
    table_seed: int = 0
    log_every: int = 100               # steps per entry of the loss log
    init_from: str | None = None       # continue from these weights (an HF folder) instead of a fresh init
    stream_seed: int | None = None     # seed of the corpus stream (default: ``seed``)
    post_ln: bool = False              # OPT-350m's layout: LayerNorm after each residual add
    embed_proj_dim: int | None = None  # word_embed_proj_dim < d_model adds project_in/project_out
    checkpoint_every: int = 500        # steps between checkpoints (when ``train`` gets a path)


def organism_config(tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig) -> OPTConfig:
    """The OPTConfig of the organism: pre-LN (or post-LN), tied embeddings, OPT's special-token ids."""
    rows = math.ceil(len(tokenizer) / 8) * 8  # padded like OPT's 50265 -> 50272
    return OPTConfig(
        vocab_size=rows, hidden_size=cfg.d_model, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, ffn_dim=cfg.ffn_dim,
        word_embed_proj_dim=cfg.embed_proj_dim or cfg.d_model, max_position_embeddings=cfg.seq_len,
        do_layer_norm_before=not cfg.post_ln, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, init_std=0.02)


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, corpus_config: CorpusConfig | None = None, progress: bool = True,
          on_log: Callable[[int, float, OPTForCausalLM], None] | None = None, *,
          tokenizer: PreTrainedTokenizerFast | None = None, batches: Iterator[torch.Tensor] | None = None,
          checkpoint: str | os.PathLike | None = None,
          ) -> tuple[OPTForCausalLM, PreTrainedTokenizerFast, dict]:
    """Train from scratch (or resume from ``checkpoint``); returns the model (eval mode), its
    tokenizer and a log dict (``losses``: mean loss per ``log_every`` steps, ``seconds``: wall
    time, ``config``). ``tokenizer`` and ``batches`` (``[batch_size, seq_len + 1]`` token ids)
    default to organism v2's. ``on_log(step, mean_loss, model)`` is called after each
    ``log_every`` steps (for progress lines in background runs)."""
    seed_everything(cfg.seed, cfg.threads)
    if tokenizer is None:
        tokenizer = build_tokenizer()
    if cfg.init_from:
        model = OPTForCausalLM.from_pretrained(cfg.init_from)
    else:
        model = OPTForCausalLM(organism_config(tokenizer, cfg))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95))
    if batches is None:
        batches = Corpus(corpus_config, table_seed=cfg.table_seed).token_batches(
            tokenizer.get_vocab(), cfg.batch_size, cfg.seq_len,
            seed=cfg.seed if cfg.stream_seed is None else cfg.stream_seed)
    state = resume(checkpoint, cfg, model, optimizer, batches)
    losses, window = state["losses"], []
    start = time.perf_counter() - state["seconds"]
    columns = [TextColumn("training organism"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=state["step"], loss=float("nan"))
        for step in range(state["step"], cfg.steps):
            batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            window.append(loss.item())
            if len(window) == cfg.log_every or step == cfg.steps - 1:
                losses.append(sum(window) / len(window))
                window = []
                bar.update(task, loss=losses[-1])
                if on_log is not None:
                    on_log(step + 1, losses[-1], model)
            if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0 and not window:
                save_checkpoint(checkpoint, step + 1, model, optimizer, losses,
                                time.perf_counter() - start)
            bar.advance(task)
    model.eval()
    log = {"losses": losses, "seconds": time.perf_counter() - start, "config": asdict(cfg)}
    return model, tokenizer, log


def save_checkpoint(path: str | os.PathLike, step: int, model: OPTForCausalLM,
                    optimizer: torch.optim.Optimizer, losses: list[float], seconds: float) -> None:
    """The run's state after ``step`` steps, written atomically (a temporary file renamed over)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "losses": losses, "seconds": seconds}, staging)
    staging.replace(path)


def resume(path: str | os.PathLike | None, cfg: TrainConfig, model: OPTForCausalLM,
           optimizer: torch.optim.Optimizer, batches: Iterator[torch.Tensor]) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer`` and replay ``batches`` to its step; the
    fresh state (step 0) when there is none."""
    if path is None or not Path(path).exists():
        return {"step": 0, "losses": [], "seconds": 0.0}
    state = torch.load(path, weights_only=True)
    if state["step"] % cfg.log_every:
        raise TrainingError(f"checkpoint {path} is at step {state['step']}, not a multiple of "
                            f"log_every={cfg.log_every}; delete it or train with its log_every")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for _ in range(state["step"]):
        next(batches)
    return state


def save_organism(model: OPTForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: str | os.PathLike) -> Path:
    """Write the HF folder (config.json, model.safetensors, tokenizer files) atomically:
    into a temporary sibling first, then renamed over ``folder``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "generation_config.json").unlink(missing_ok=True)
    staging.chmod(0o755)  # mkdtemp makes it private; package data must be readable by all
    for file in staging.iterdir():
        file.chmod(0o644)
    old = folder.with_name(f".{folder.name}-old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
