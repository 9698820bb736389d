"""Training dictionaries from stores: SIGKILL and resume ends bitwise where an uninterrupted run
ends; an S3 store feeds training exactly as a local one; transcoders; refused resumes."""

from __future__ import annotations

import subprocess

import pytest
import torch

from features_fixtures import HOOK, QUICK, single_thread, small_store  # noqa: F401 (fixture)
from microscope.analysis.features import load_dictionary, reconstruction_metrics, train_dictionary
from microscope.errors import StoreMismatchError
from test_store_fixtures import python, subprocess_env, wait_then_kill


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return small_store(tmp_path_factory.mktemp("train"))[1]


def same_weights(a, b) -> bool:
    sa, sb = a.coder.state_dict(), b.coder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_killed_run_resumes_to_the_same_weights(store, tmp_path):
    args = dict(QUICK, steps=120, checkpoint_every=10)
    reference = train_dictionary(store, HOOK, tmp_path / "reference", **args)
    out = tmp_path / "killed"
    cli = [python(), "-m", "microscope", "features", "train", store.path, "--hook", HOOK, "--out", str(out),
           "--no-progress", *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()]]
    proc = subprocess.Popen(cli, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_then_kill(proc, lambda: (out / "checkpoint.pt").exists())
    assert proc.returncode == -9 and not (out / "cfg.json").exists(), "training finished before the kill"
    resumed = train_dictionary(store, HOOK, out, **args)
    assert 0 < resumed.provenance["resumed_from_step"] < 120
    assert same_weights(resumed, reference)
    assert same_weights(load_dictionary(out), reference)
    again = train_dictionary(store, HOOK, out, **args)            # a finished run is loaded, not retrained
    assert again.provenance["resumed_from_step"] == resumed.provenance["resumed_from_step"]


def test_training_lowers_fvu_and_records_provenance(store, tmp_path):
    d = train_dictionary(store, HOOK, tmp_path / "d", **dict(QUICK, steps=100))
    untrained = train_dictionary(store, HOOK, tmp_path / "d0", **dict(QUICK, steps=1, checkpoint_every=1))
    fvu, fvu_untrained = reconstruction_metrics(d, store)["fvu"], reconstruction_metrics(untrained, store)["fvu"]
    assert fvu < 0.75 * fvu_untrained
    p = d.provenance
    assert p["hook"] == HOOK and p["store"] == store.path and p["store_fingerprint"].startswith("sha256:")
    assert p["settings"]["seed"] == 0 and p["tokens_seen"] == 100 * 32 and p["weights_hash"]
    with pytest.raises(StoreMismatchError, match="settings"):
        train_dictionary(store, HOOK, tmp_path / "d", **dict(QUICK, steps=100, k=8))


def test_transcoder_predicts_the_mlp_output(store, tmp_path):
    d = train_dictionary(store, "blocks.1.hook_resid_mid", tmp_path / "tc", transcode_to="blocks.1.hook_mlp_out",
                         **dict(QUICK, steps=100))
    assert d.is_transcoder and d.target == "blocks.1.hook_mlp_out"
    assert reconstruction_metrics(d, store)["fvu"] < 0.9


def test_s3_store_feeds_training_exactly_as_a_local_one(tmp_path, s3_endpoint):
    options = {"endpoint_url": s3_endpoint, "asynchronous": True}
    _, remote = small_store(tmp_path / "r", hooks=HOOK, out="s3://stores/f.zarr", storage_options=options)
    _, local = small_store(tmp_path / "l", hooks=HOOK)
    a = train_dictionary("s3://stores/f.zarr", HOOK, tmp_path / "a", storage_options=options, **dict(QUICK, steps=10))
    b = train_dictionary(local, HOOK, tmp_path / "b", **dict(QUICK, steps=10))
    assert remote.n_tokens == local.n_tokens and same_weights(a, b)


from test_s3 import s3_endpoint  # noqa: E402,F401 (the loopback S3 server fixture)
