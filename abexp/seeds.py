"""Per-(seed, epoch, stream) RNG seeds: the data order and augmentation of an epoch and the
delay draws of a chunk depend on these alone, so a resumed run draws what an uninterrupted
one would. Shared by abexp.data and abexp.sim, hence at the top."""

from __future__ import annotations

import hashlib


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch, stream)."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
