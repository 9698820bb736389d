"""Helpers shared by the tests/test_features_*.py files (no tests here): one thread, a small
labelled store from a tiny OPT, and a short training run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from microscope.activations.dump import dump
from microscope.activations.reader import open_store
from test_store_fixtures import WORDS, make_model_dir

HOOK = "blocks.1.hook_resid_post"
QUICK = dict(steps=30, batch_size=32, expansion_factor=4, k=4, checkpoint_every=10, dead_tokens=500)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One thread, set before the module's fixtures run: results never depend on the thread count,
    and tests do not fight other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def labelled_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """n prompts of 3-20 random words with a "label" (a/b) and a numeric "score" field."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS[4:]) for _ in range(rng.randint(3, 20)))
            f.write(json.dumps({"text": text, "label": rng.choice("ab"), "score": rng.random(), "id": i}) + "\n")
    return path


def small_store(root: Path, n_prompts: int = 40, hooks: str = "blocks.*.hook_resid_post,blocks.1.hook_resid_mid,"
                "blocks.1.hook_mlp_out", chunk_rows: int = 128, **options):
    """(model folder, store) of a tiny pre-LN OPT over labelled prompts (about 500 tokens)."""
    model_dir = make_model_dir(root / "model")
    prompts = labelled_prompts(root / "p.jsonl", n_prompts)
    out = options.pop("out", str(root / "s.zarr"))
    dump(str(model_dir), str(prompts), hooks, out, chunk_rows=chunk_rows, dtype="fp32", **options)
    return model_dir, open_store(out, storage_options=options.get("storage_options"))
