"""Ranks under `torchrun`, grouped into model replicas of `gpus_per_model` consecutive ranks.

Rank r belongs to replica r // K; the first rank of each replica (its leader) loads the model over
the K GPUs of its group (local ranks leader..leader+K-1, through accelerate's device map) and runs
the forward passes; the other ranks of the group lend their GPUs and wait at the barriers. Work
units are dealt round-robin over replicas from the list of uncommitted units, so a rerun with a
different world size or K resumes correctly. Backend: NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from microscope.errors import MicroscopeError


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: global rank, world size, and its model replica."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    gpus_per_model: int = 1

    @property
    def n_replicas(self) -> int:
        return self.world_size // self.gpus_per_model

    @property
    def replica(self) -> int:
        return self.rank // self.gpus_per_model

    @property
    def is_leader(self) -> bool:
        """Runs the model of its replica (the first rank of the group)."""
        return self.rank % self.gpus_per_model == 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def replica_devices(self) -> list[int]:
        """CUDA device indices of this replica on this node: local_rank .. local_rank + K - 1."""
        return list(range(self.local_rank, self.local_rank + self.gpus_per_model))

    def my_units(self, pending: list[int]) -> list[int]:
        """This replica's share of the pending unit indices (round-robin; empty for non-leaders)."""
        return pending[self.replica::self.n_replicas] if self.is_leader else []


def init_ranks(gpus_per_model: int = 1) -> Ranks:
    """Read torchrun's environment and join the process group (a no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpus_per_model < 1 or world_size % gpus_per_model:
        raise MicroscopeError(f"--gpus-per-model {gpus_per_model} must divide the world size "
                              f"({world_size} ranks) so every replica gets a whole group of ranks")
    ranks = Ranks(rank, world_size, local_rank, gpus_per_model)
    if ranks.distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return ranks


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def broadcast_object(ranks: Ranks, value):
    """Rank 0's `value` on every rank (e.g. an error message that must stop all of them)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(ranks: Ranks, value: float) -> float:
    if not ranks.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
