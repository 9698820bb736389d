"""Multi-rank dumps under torchrun (gloo on CPU): the store equals a single-process dump, with
replicas of several ranks (--gpus-per-model) and after one rank is killed and the job resumed
with another world size."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from test_store_fixtures import (assert_stores_identical, cli_dump_one_thread, committed_count, dump_args,
                                 python, reference_dump, subprocess_env, wait_then_kill)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return reference_dump(tmp_path_factory.mktemp("dist"), 60)


def torchrun(n: int, *args: str) -> list[str]:
    return [python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "-m", "microscope", *args]


def workers(launcher: subprocess.Popen) -> list[int]:
    """PIDs of the rank processes torchrun started."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return sorted(int(c) for c in children)


def test_four_ranks_as_two_replicas_equal_one_process(setup, tmp_path):
    model_dir, prompts, reference = setup
    out = tmp_path / "s.zarr"
    launcher = subprocess.Popen(torchrun(4, *dump_args(model_dir, prompts, out, "--gpus-per-model", "2")),
                                env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        for pid in workers(launcher):
            os.kill(pid, 9)
        launcher.kill()
        raise
    assert launcher.returncode == 0, output[-3000:]
    assert_stores_identical(out, reference)


@pytest.mark.parametrize("ranks,per_model", [(2, 1), (4, 2)], ids=["2 ranks", "4 ranks as 2 replicas"])
def test_one_rank_killed_then_resumed_with_one_rank(setup, tmp_path, ranks, per_model):
    """The victim is the leader of the last replica (rank 1 of 2, rank 2 of 4): its share of the
    units stays uncommitted, whatever the other replica finishes before torchrun stops the job.
    On a busy machine one replica can finish its whole share before the other commits the units
    the kill waits for; such a run proves nothing, so it is run again (three tries)."""
    model_dir, prompts, reference = setup
    n_units = len(list((reference / "committed" / "c").iterdir()))
    extra = ("--gpus-per-model", str(per_model))
    for attempt in range(3):
        out = tmp_path / f"s{attempt}.zarr"
        launcher = subprocess.Popen(torchrun(ranks, *dump_args(model_dir, prompts, out, *extra)),
                                    env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_then_kill(launcher, lambda: committed_count(out) >= 4, victim=lambda: workers(launcher)[-per_model])
        if committed_count(out) < n_units:
            break
    assert committed_count(out) < n_units, "the dump finished before the kill three times: the test proves nothing"
    result = cli_dump_one_thread(*dump_args(model_dir, prompts, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert_stores_identical(out, reference)
