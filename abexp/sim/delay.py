"""The delay model: how stale each step's gradient is, and the ring buffer of forward weights.

At step t the gradient is computed at the forward weights of step t - tau_t (docs/science.md §1).
One mechanism serves every delay kind and every mitigation: a ring buffer of the last
D_max + 1 forward weights, one flat tensor of shape [D_max + 1, P].
"""

from __future__ import annotations

import math

import torch

from abexp.seeds import epoch_seed

_CHUNK = 4096  # delays are drawn in seeded chunks: tau_t is a pure function of (seed, t)


class DelaySampler:
    """tau_t for every step: constant D, uniform on [0, D_max], geometric(mean) capped at D_max,
    a replayed trace (cycled), or draws from a histogram {tau: weight}.

    Stateless by construction (chunk c of draws is seeded by (seed, c)), so a resumed run draws
    exactly the delays an uninterrupted one would, with nothing to checkpoint.
    """

    def __init__(self, kind: str, steps: int, mean: float | None = None, seed: int = 0,
                 trace: list[int] | None = None, histogram: dict[int, float] | None = None):
        self.kind, self.max, self.mean, self.seed = kind, int(steps), mean, seed
        self.trace, self.histogram = trace, histogram
        if kind == "trace":
            self.max = max(trace) if trace is not None else max(histogram)
        self._chunk_index, self._chunk = -1, []

    @classmethod
    def from_config(cls, delay, seed: int) -> "DelaySampler":
        from abexp.config import read_trace
        trace = read_trace(delay.trace, delay.steps) if delay.kind == "trace" and delay.trace else None
        return cls(delay.kind, delay.steps, delay.mean, seed if delay.seed is None else delay.seed,
                   trace, delay.histogram)

    def __call__(self, t: int) -> int:
        if self.kind == "trace" and self.trace is not None:
            return self.trace[t % len(self.trace)]
        if self.kind == "constant" or self.max == 0:
            return self.max
        chunk = t // _CHUNK
        if chunk != self._chunk_index:
            # a Python list: reading one tensor element per step would be a host read per step
            self._chunk, self._chunk_index = self._draw(chunk).tolist(), chunk
        return self._chunk[t % _CHUNK]

    def _draw(self, chunk: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, chunk, stream=7))
        if self.kind == "uniform":
            return torch.randint(0, self.max + 1, (_CHUNK,), generator=gen)
        if self.kind == "geometric":  # P(k) = p (1-p)^k, mean (1-p)/p, then capped
            p = 1.0 / (1.0 + float(self.mean))
            if p >= 1.0:
                return torch.zeros(_CHUNK, dtype=torch.long)
            u = torch.rand(_CHUNK, generator=gen, dtype=torch.float64).clamp_min(1e-300)
            return (torch.log(u) / math.log1p(-p)).floor().long().clamp(0, self.max)
        if self.kind == "trace":  # a histogram
            taus = torch.tensor(sorted(self.histogram), dtype=torch.long)
            weights = torch.tensor([float(self.histogram[k]) for k in sorted(self.histogram)], dtype=torch.float64)
            return taus[torch.multinomial(weights, _CHUNK, replacement=True, generator=gen)]
        raise ValueError(f"unknown delay kind {self.kind!r}")

    def expected(self) -> float:
        """E[tau]: the look-ahead linear weight prediction uses by default."""
        if self.kind == "constant":
            return float(self.max)
        if self.kind == "uniform":
            return self.max / 2.0
        if self.kind == "trace":
            if self.trace is not None:
                return sum(self.trace) / len(self.trace)
            return sum(k * w for k, w in self.histogram.items()) / sum(self.histogram.values())
        p = 1.0 / (1.0 + float(self.mean))
        q = 1.0 - p  # E[min(K, cap)] = sum_{k=1..cap} P(K >= k) = sum q^k
        return sum(q ** k for k in range(1, self.max + 1))


class WeightHistory:
    """Ring buffer of the forward weights of the last ``max_delay + 1`` steps."""

    def __init__(self, max_delay: int, numel: int, device, dtype=torch.float32):
        self.slots = max_delay + 1
        self.buffer = torch.zeros(self.slots, numel, device=device, dtype=dtype)

    def slot(self, t: int) -> torch.Tensor:
        """The slot that step t's forward weights are written to."""
        return self.buffer[t % self.slots]

    def stale(self, t: int, tau: int) -> torch.Tensor:
        """Forward weights of step max(t - tau, 0): while the pipeline fills, only w_0 exists."""
        if tau > self.slots - 1:
            raise ValueError(f"delay {tau} exceeds the buffer's maximum {self.slots - 1}")
        return self.buffer[max(t - tau, 0) % self.slots]
