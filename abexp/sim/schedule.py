"""Learning-rate schedules as pure functions of the step: resuming needs no scheduler state."""

from __future__ import annotations

import math

from abexp.config import ScheduleCfg


def lr_at(step: int, base_lr: float, total_steps: int, steps_per_epoch: int,
          cfg: ScheduleCfg) -> float:
    """lr for update ``step`` (0-based): linear warmup, then constant / multistep / cosine, times
    the epoch's factor when ``cfg.epoch_factors`` gives one per epoch.

    Multistep milestones are fractions of training: lr is multiplied by gamma at each.
    """
    lr = _named(step, base_lr, total_steps, steps_per_epoch, cfg)
    if cfg.epoch_factors is None:
        return lr
    return lr * cfg.epoch_factors[step // steps_per_epoch]  # one per epoch: validate() checks the count


def _named(step: int, base_lr: float, total_steps: int, steps_per_epoch: int, cfg: ScheduleCfg) -> float:
    """The named schedule's lr at ``step``, before any epoch factor."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if cfg.name == "constant":
        return base_lr
    if cfg.name == "multistep":
        passed = sum(1 for m in cfg.milestones if step >= int(round(m * total_steps)))
        return base_lr * cfg.gamma ** passed
    if cfg.name == "cosine":
        span = max(1, total_steps - warmup)
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * (step - warmup) / span))
    raise ValueError(f"unknown schedule {cfg.name!r}")
