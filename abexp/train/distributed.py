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

    def all_reduce_max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t``, stacked in rank order (``t`` itself, unstacked, alone)."""
        if not self.enabled:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return torch.stack(out)

    def barrier(self) -> None:
        if self.enabled:  # NCCL: name this rank's GPU, never let it guess
            nccl = dist.get_backend() == "nccl"
            dist.barrier(device_ids=[self.local_rank] if nccl else None)


def init_from_env(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1). On CUDA
    the rank's GPU is set first and bound to the group (``device_id``), so NCCL never guesses
    it (a guess puts every rank's first collective on GPU 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
