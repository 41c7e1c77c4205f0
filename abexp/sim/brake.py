"""What Adaptive Braking actually does to the gradient: the factor 1 − ρ·cos(g, v) it applies,
gathered per epoch as its mean and standard deviation over every (step, parameter tensor)
pair (one value per step with ``optim.ab_cosine: global``), so a reader can see whether AB
does more than shrink the learning rate (a constant factor would be just that).

The sums stay on the device (no host sync per step); ``read`` syncs once per epoch. They are
part of the optimizer's checkpoint, so a run resumed mid-epoch reports what an uninterrupted
one would.
"""

from __future__ import annotations

import math

import torch


class BrakeLog:
    """Running sum and sum of squares of the brake factors, and how many there were."""

    def __init__(self, device) -> None:
        self.sums = torch.zeros(2, device=device, dtype=torch.float64)
        self.count = 0

    def record(self, scale: torch.Tensor) -> None:
        """``scale``: this step's factors, one per tensor (or one, global)."""
        s = scale.detach().double()
        self.sums += torch.stack([s.sum(), (s * s).sum()])
        self.count += s.numel()

    def read(self) -> dict[str, float]:
        """{brake_mean, brake_sd} since the last read (population sd), then start again; {} when
        no step braked (AB with rho 0, or a diverged first step)."""
        if not self.count:
            return {}
        total, squares = (float(v) for v in self.sums.tolist())
        mean = total / self.count
        sd = math.sqrt(max(0.0, squares / self.count - mean * mean))
        self.sums.zero_()
        self.count = 0
        return {"brake_mean": mean, "brake_sd": sd}

    def state_dict(self) -> dict:
        return {"sums": self.sums, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.count = int(state["count"])
