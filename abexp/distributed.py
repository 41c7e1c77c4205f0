"""Data parallelism under torchrun: gradients are all-reduced *before* they enter the delay
engine, so every rank holds identical weights, ring buffer and optimizer state.

Batch-norm statistics are local to each rank (no SyncBN), as with plain DDP: a 2-process run
with global batch B computes the same gradient as a 1-process run with ``train.micro_batches:
2`` (two half-batches, gradients averaged). Running BN buffers are broadcast from rank 0 at
the end of every epoch so that evaluation and checkpoints agree on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
            t.div_(self.world)
        return t

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.broadcast(t, src=0)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_env(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
