"""Train a TopK SAE or transcoder from an activation store, with checkpoints, resume and provenance.

    d = train_dictionary("activations/demo.zarr", "blocks.1.hook_resid_post", "results/dict",
                         steps=2000, k=16, expansion_factor=8)
    d = train_dictionary(store, "blocks.1.hook_resid_mid", "results/tc",
                         transcode_to="blocks.1.hook_mlp_out")            # a transcoder

The model is eai-sparsify's `SparseCoder`; the loop follows sparsify's own trainer: decoder
biases set to the mean of the first batch, decoder rows renormalised every step and the gradient
parallel to them removed (SAE), Adam at sparsify's default rate 2e-4 / sqrt(latents / 2^14) with
linear warm-up and decay, an AuxK loss on latents silent for `dead_tokens` tokens. Loss: FVU.

Every `checkpoint_every` steps the coder, the optimiser, the schedule and the dead-latent counters
are written atomically to ``OUT/checkpoint.pt``; a rerun with the same arguments resumes there and
ends with the same weights as an uninterrupted run (bitwise on CPU: the feed replays the same
batches, nothing else draws random numbers). Under `torchrun` every rank trains on its own
batches and gradients are averaged (gloo on CPU, NCCL on GPU); rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import get_linear_schedule_with_warmup

from microscope import __version__
from microscope.activations.distributed import Ranks, barrier, init_ranks
from microscope.activations.reader import ActivationStore, open_store
from microscope.analysis.features.coder import Dictionary, load_dictionary, new_coder
from microscope.analysis.features.feed import StoreFeed
from microscope.analysis.progress import Progress, report
from microscope.errors import AnalysisInputError, StoreMismatchError, UnknownSettingError
from microscope.provenance import git_state

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    """How a dictionary is trained. Sizes in tokens (rows of the store) unless named otherwise."""

    expansion_factor: int = 8          # latents = expansion_factor x input width (unless n_latents)
    n_latents: int | None = None
    k: int = 16                        # active latents per token (TopK)
    batch_size: int = 1024             # tokens per step and rank
    steps: int = 1000
    lr: float | None = None            # None: sparsify's 2e-4 / sqrt(n_latents / 2**14)
    warmup_steps: int = 50
    auxk_alpha: float = 1 / 32         # weight of the AuxK loss on dead latents
    dead_tokens: int = 1_000_000       # a latent silent this many tokens is dead (sparsify: 10M)
    checkpoint_every: int = 100        # steps
    buffer_chunks: int = 8             # store chunks held by the shuffle buffer
    seed: int = 0                      # initialisation and batch order

    def but(self, **changes) -> TrainSettings:
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise UnknownSettingError(f"unknown training setting(s) {', '.join(unknown)}; the settings are "
                                      f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)


def store_fingerprint(store: ActivationStore) -> str:
    """sha256 of what makes a store's rows what they are (model weights, prompts, tokens, hooks, dtype)."""
    text = json.dumps(store.settings, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def train_dictionary(store, hook: str, out: str | Path, *, transcode_to: str | None = None,
                     settings: TrainSettings | None = None, resume: bool = True, progress: Progress | None = None,
                     storage_options: dict | None = None, command_line: str | None = None,
                     device: str | None = None, on_step: Callable[[dict], None] | None = None,
                     **changes) -> Dictionary:
    """Train on `hook` of `store` (an `ActivationStore`, a folder or an fsspec URL) into folder `out`.

    transcode_to: train a transcoder predicting this hook from `hook`. `changes` set single
    `TrainSettings` fields (``k=32, steps=500``). resume: continue from OUT/checkpoint.pt (a
    finished run is loaded, not retrained); False starts over. command_line: recorded in the
    provenance. device: where the coder trains (default: this rank's GPU when CUDA is available,
    else the CPU); the returned dictionary is on the CPU. on_step receives
    {"step", "steps", "fvu", "dead", "tokens_per_s"} after every step (rank 0); progress hears
    ("training HOOK: tokens/s, FVU, dead share", step, steps) (rank 0, `analysis.progress`)."""
    settings = (settings or TrainSettings()).but(**changes)
    if not isinstance(store, ActivationStore):
        store = open_store(store, storage_options=storage_options)
    ranks = init_ranks()
    out = Path(out)
    feed = StoreFeed(store, hook, settings.batch_size, target=transcode_to, seed=settings.seed,
                     buffer_chunks=settings.buffer_chunks)
    if feed.d_in != feed.d_out:
        raise AnalysisInputError(f"a transcoder needs equal widths (sparsify's SparseCoder): {hook} has "
                                 f"{feed.d_in}, {transcode_to} has {feed.d_out}")
    identity = {"store_fingerprint": store_fingerprint(store), "hook": hook, "target": feed.target,
                "transcode": transcode_to is not None, "settings": asdict(settings), "world_size": ranks.world_size}
    n_latents = settings.n_latents or settings.expansion_factor * feed.d_in
    device = torch.device(device or (f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"))
    coder = new_coder(feed.d_in, n_latents=n_latents, k=settings.k, transcode=transcode_to is not None,
                      seed=settings.seed).to(device)
    lr = settings.lr or 2e-4 / (n_latents / 2 ** 14) ** 0.5
    optimizer = torch.optim.Adam(coder.parameters(), lr=lr)
    schedule = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    state = {"step": 0, "since_fired": torch.zeros(n_latents, dtype=torch.long, device=device), "history": [],
             "tokens": 0}
    checkpoint = out / CHECKPOINT_FILE
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False, map_location=device)
        if saved["identity"] != identity:
            changed = [k for k in identity if saved["identity"].get(k) != identity[k]]
            raise StoreMismatchError(f"{checkpoint} belongs to another run ({', '.join(changed)} differ); "
                                     "use another --out or start over with resume=False (--no-resume)")
        if saved["state"]["step"] >= settings.steps and (out / "cfg.json").is_file():
            return load_dictionary(out)
        coder.load_state_dict(saved["coder"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = saved["state"]
    resumed_from = state["step"]

    def save_checkpoint() -> None:
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
            partial = checkpoint.with_suffix(".partial")
            torch.save({"identity": identity, "coder": coder.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "state": state}, partial)
            os.replace(partial, checkpoint)
        barrier(ranks)

    started, tokens_now = time.perf_counter(), 0
    progress = progress if ranks.is_main else None
    report(progress, f"training {hook}", state["step"], settings.steps)
    for step, (x, y) in feed.steps(state["step"], ranks.rank, ranks.world_size):
        if step >= settings.steps:
            break
        record = train_step(coder, optimizer, schedule, x.to(device), y.to(device), state, settings, ranks)
        tokens_now += len(x) * ranks.world_size
        state["step"] = step + 1
        state["tokens"] += len(x) * ranks.world_size
        record["tokens_per_s"] = tokens_now / (time.perf_counter() - started)
        record["steps"] = settings.steps
        report(progress, f"training {hook}: {record['tokens_per_s']:,.0f} tok/s, FVU {record['fvu']:.3f}, "
                         f"dead {record['dead']:.1%}", step + 1, settings.steps)
        if on_step is not None and ranks.is_main:
            on_step(record)
        if state["step"] % settings.checkpoint_every == 0 or state["step"] == settings.steps:
            state["history"].append({k: record[k] for k in ("step", "fvu", "dead")})
            save_checkpoint()
    seconds = time.perf_counter() - started
    if not coder.cfg.transcode:
        coder.set_decoder_norm_to_unit_norm()
    commit, dirty = git_state()
    dictionary = Dictionary(coder.cpu().eval(), hook, feed.target, {
        **identity, "store": store.path, "store_model": store.settings.get("model"),
        "weights_hash": store.settings.get("weights_hash"),
        "n_latents": n_latents, "lr": lr, "steps_done": state["step"], "tokens_seen": state["tokens"],
        "resumed_from_step": resumed_from, "tokens_per_s_this_run": tokens_now / seconds if seconds else None,
        "history": state["history"], "code_version": __version__, "git_commit": commit, "git_dirty": dirty,
        "torch": torch.__version__, "command": command_line})
    if ranks.is_main:
        dictionary.save(out)
    barrier(ranks)
    return dictionary


def train_step(coder, optimizer, schedule, x: torch.Tensor, y: torch.Tensor, state: dict,
                settings: TrainSettings, ranks: Ranks) -> dict:
    """One optimiser step on this rank's batch x -> y ([batch, d] each); returns {"step", "fvu",
    "dead"} (averaged over ranks). `state` holds "step" and "since_fired" (the loop's counters)."""
    transcode = coder.cfg.transcode
    if state["step"] == 0:  # centre the pre-activations at initialisation, as sparsify does
        with torch.no_grad():
            if transcode:
                coder.encoder.bias.data = -_mean_over_ranks(x.mean(0), ranks) @ coder.encoder.weight.data.T
            coder.b_dec.data = _mean_over_ranks(y.mean(0), ranks)
    if not transcode:
        coder.set_decoder_norm_to_unit_norm()
    dead = state["since_fired"] > settings.dead_tokens
    out = coder(x, y if transcode else None, dead_mask=dead if settings.auxk_alpha > 0 else None)
    loss = out.fvu + settings.auxk_alpha * out.auxk_loss
    loss.backward()
    if ranks.distributed:
        for p in coder.parameters():
            p.grad = _mean_over_ranks(p.grad, ranks)
    if not transcode:
        coder.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    fired = torch.zeros(coder.num_latents, dtype=torch.float32, device=x.device)
    fired[out.latent_indices.flatten()] = 1.0
    fired = _mean_over_ranks(fired, ranks) > 0
    state["since_fired"] += len(x) * ranks.world_size
    state["since_fired"][fired] = 0
    return {"step": state["step"] + 1, "fvu": float(_mean_over_ranks(out.fvu.detach(), ranks)),
            "dead": float((state["since_fired"] > settings.dead_tokens).float().mean())}


def _mean_over_ranks(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if not ranks.distributed:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / ranks.world_size
