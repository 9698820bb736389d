"""Training under torchrun (gloo on CPU): two ranks train on their own batches with averaged
gradients; rank 0 writes one dictionary that has seen both ranks' tokens."""

from __future__ import annotations

import subprocess

import pytest

from features_fixtures import HOOK, single_thread, small_store  # noqa: F401 (fixture)
from microscope.analysis.features import load_dictionary, reconstruction_metrics, train_dictionary
from test_store_fixtures import python, subprocess_env


@pytest.mark.slow
def test_two_ranks_train_one_dictionary(tmp_path):
    _, store = small_store(tmp_path)
    out = tmp_path / "ddp"
    args = ["--steps", "60", "--batch-size", "32", "--k", "4", "--expansion-factor", "4", "--dead-tokens", "500"]
    run = subprocess.run([python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "microscope", "features", "train", store.path, "--hook", HOOK, "--out", str(out),
                          "--no-progress", *args], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    d = load_dictionary(out)
    assert d.provenance["world_size"] == 2 and d.provenance["tokens_seen"] == 2 * 60 * 32
    alone = train_dictionary(store, HOOK, tmp_path / "one", steps=1, batch_size=32, k=4, expansion_factor=4,
                             checkpoint_every=1)
    assert reconstruction_metrics(d, store)["fvu"] < 0.75 * reconstruction_metrics(alone, store)["fvu"]
