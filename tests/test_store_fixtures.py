"""Helpers shared by the store, dump and distributed tests (no tests here): tiny model folders with a
word-level tokenizer, prompt files, and a bit-for-bit comparison of two stores."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import zarr

from conftest import tiny_model
from microscope.models.organism.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)]   # 96 ids: the tiny vocab


def make_model_dir(path: Path, layout: str = "pre_ln", seed: int = 0) -> Path:
    """A tiny OPT (conftest layout) with a word-level tokenizer, saved as an HF folder."""
    model = tiny_model(layout, seed=seed)
    model.save_pretrained(path)
    build_tokenizer(WORDS).save_pretrained(path)
    return path


def make_prompts(path: Path, n: int, min_words: int = 1, max_words: int = 20, seed: int = 0) -> Path:
    """A .jsonl prompt file of n prompts of random words, each with a "pick" positions field."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = rng.randint(min_words, max_words)
            text = " ".join(rng.choice(WORDS[4:]) for _ in range(k))
            pick = sorted(rng.sample(range(k + 1), min(2, k + 1)))   # positions among k+1 tokens (BOS)
            f.write(json.dumps({"text": text, "id": i, "pick": pick}) + "\n")
    return path


def assert_stores_identical(a: Path, b: Path) -> None:
    """Every array of the two stores holds the same bytes (index arrays, hooks, commit markers)."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names_a = sorted(n for n, _ in ga.arrays()) + sorted(f"hooks/{n}" for n, _ in ga["hooks"].arrays())
    names_b = sorted(n for n, _ in gb.arrays()) + sorted(f"hooks/{n}" for n, _ in gb["hooks"].arrays())
    assert names_a == names_b
    for name in names_a:
        x, y = ga[name][...], gb[name][...]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.kind in "iuf":
            assert x.tobytes() == y.tobytes(), f"{name} differs"
        else:
            assert list(x) == list(y), f"{name} differs"
    assert ga.attrs["microscope"]["fingerprint"] == gb.attrs["microscope"]["fingerprint"]


def dump_args(model_dir: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["dump", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
            "--hooks", "blocks.*.hook_resid_post,blocks.1.attn.hook_pattern", "--chunk-rows", "16",
            "--batch-tokens", "1", *extra]


def cli_dump_one_thread(*args: str):
    """Run `microscope <args>` in this process with one torch thread, the thread count of the
    subprocess dumps (`subprocess_env`), so floating-point results match theirs bit for bit."""
    from typer.testing import CliRunner

    from microscope.cli import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(threads)


def reference_dump(root: Path, n_prompts: int) -> tuple[Path, Path, Path]:
    """A tiny model, `n_prompts` prompts of 3-30 words, and their store dumped in this process with
    one thread: the reference an interrupted or multi-rank dump must equal. Returns the three paths."""
    model_dir = make_model_dir(root / "model")
    prompts = make_prompts(root / "p.jsonl", n_prompts, min_words=3, max_words=30)
    reference = root / "reference.zarr"
    result = cli_dump_one_thread(*dump_args(model_dir, prompts, reference))
    assert result.exit_code == 0, result.output
    return model_dir, prompts, reference


def subprocess_env() -> dict:
    """One thread per process, so floating-point results never depend on the thread count."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def committed_count(store: Path) -> int:
    chunks = store / "committed" / "c"
    return len(os.listdir(chunks)) if chunks.exists() else 0


def wait_then_kill(proc: subprocess.Popen, ready, victim=None, timeout: float = 120.0) -> None:
    """Poll `ready()` every few ms; once true, SIGKILL `victim()` (default: the process itself)."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the dump exited (rc {proc.returncode}) before the kill point")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.005)
    pid = victim() if victim is not None else proc.pid
    os.kill(pid, 9)
    proc.wait(timeout=60)


def python() -> str:
    return sys.executable
