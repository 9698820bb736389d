"""Crash safety: a dump killed with SIGKILL, then resumed, equals an uninterrupted dump bit for bit."""

from __future__ import annotations

import subprocess

import pytest

from microscope.activations.reader import open_store
from test_store_fixtures import (assert_stores_identical, cli_dump_one_thread, committed_count, dump_args,
                                 python, reference_dump, subprocess_env, wait_then_kill)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return reference_dump(tmp_path_factory.mktemp("crash"), 80)


KILL_POINTS = {
    "while laying out the store": lambda out: (out / "token_id" / "zarr.json").exists(),
    "after the first commit": lambda out: committed_count(out) >= 1,
    "half way": lambda out: committed_count(out) >= 20,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_then_resumed_equals_uninterrupted(setup, tmp_path, point):
    model_dir, prompts, reference = setup
    out = tmp_path / "s.zarr"
    proc = subprocess.Popen([python(), "-m", "microscope", *dump_args(model_dir, prompts, out)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_then_kill(proc, lambda: KILL_POINTS[point](out))
    n_units = len(open_store(str(reference)).units)
    assert committed_count(out) < n_units, "the dump finished before the kill: the test proves nothing"
    result = cli_dump_one_thread(*dump_args(model_dir, prompts, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert_stores_identical(out, reference)
    store = open_store(str(out))
    ids = store.prompt_ids()
    assert (ids[1:] >= ids[:-1]).all() and len(ids) == store.n_tokens      # no duplicate or lost rows
