"""Batch j of a run's batch sequence, in any order: what a parameter server hands out and what
the simulator replays from an async run's trace (update t used batch j(t))."""

from __future__ import annotations

import torch


class BatchStream:
    """Batch j of the run's sequence, for j in any order: epoch j // S is drawn in order from its
    seeded generator; batches drawn past the one asked for wait in a cache until asked for."""

    def __init__(self, batches, steps_per_epoch: int):
        self.batches, self.steps = batches, steps_per_epoch
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.epoch, self.position, self.iterator = -1, 0, None

    def get(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j in self.cache:
            return self.cache.pop(j)
        epoch, position = divmod(j, self.steps)
        if epoch != self.epoch or position < self.position:
            # drawn again from the epoch's start: the order and augmentation are seeded per epoch
            self.epoch, self.position, self.iterator = epoch, 0, iter(self.batches.epoch(epoch))
        while True:
            batch = next(self.iterator)
            index = self.epoch * self.steps + self.position
            self.position += 1
            if index == j:
                return batch
            if index not in self.cache and index > j:
                self.cache[index] = batch
