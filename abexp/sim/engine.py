"""The delay engine: one delayed optimisation step, for a ResNet or for the quadratic oracle.

``DelayedSGD.step(grad_fn, lr)`` is the single code path both use: store this step's forward
weights in the ring buffer, pick the stale weights of step t - tau_t, ask ``grad_fn`` for the
gradient there, and let the optimizer apply it to the current weights.

With per-stage delays (``delay.kind: pipeline``) the flat weight vector is cut into S contiguous
stages and the forward weights are assembled from S slices of the ring buffer, stage s from
slot t - D_s: S slice copies per step, no index tensor, no host read. Each step then carries
one staleness per stage, and every mitigation uses its stage's own value. Without weight
stashing (``delay.stashing: false``) ``begin`` also assembles the backward weights ``w_bwd``,
stage s from step t - b_s (b_s = 0: the current weights ``w``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from abexp.config import DelayCfg, OptimCfg
from abexp.sim.delay import DelaySampler, WeightHistory
from abexp.sim.optim import DelayedOptimizer


class DelayedSGD:
    """Current weights ``w``, the forward-weight history, the delay draws and the update rule."""

    def __init__(self, w0: torch.Tensor, segment_sizes: list[int], optim: OptimCfg,
                 delay: DelayCfg, seed: int, stages: list[tuple[int, int]] | None = None,
                 matrices: list[tuple[int, int] | None] | None = None):
        """``stages``: element ranges of the pipeline stages (delay.kind pipeline); by default
        the parameter tensors cut by parameter count (abexp.sim.pipeline). ``matrices``: the
        muon rules' (rows, cols) per parameter tensor, None where AdamW updates it."""
        self.w = w0.detach().clone()
        numel = self.w.numel()
        self.backward_delays, self.w_bwd = None, None
        if delay.kind == "pipeline":
            from abexp.sim.pipeline import backward_delays, stage_delays, stage_ranges
            self.stage_delays = stage_delays(delay)
            self.backward_delays = backward_delays(delay)
            if self.backward_delays is not None:
                if any(b > f for b, f in zip(self.backward_delays, self.stage_delays)):
                    raise ValueError(f"backward delays {self.backward_delays} exceed the forward delays "
                                     f"{self.stage_delays}")
                self.w_bwd = torch.empty_like(self.w)
            self.ranges = stages or stage_ranges(segment_sizes, segment_sizes, len(self.stage_delays))
            if len(self.ranges) != len(self.stage_delays):
                raise ValueError(f"{len(self.ranges)} stage ranges for {len(self.stage_delays)} stage delays")
            self.sampler = None
            self.w_fwd = torch.empty_like(self.w)  # forward weights assembled per stage
            horizons = [float(d) for d in self.stage_delays]
        elif delay.kind == "async":  # the parameter server applies updates (abexp.train.async_ps)
            self.stage_delays, self.ranges, self.sampler = None, [(0, numel)], None
            horizons = [float(delay.workers - 1)]  # N items always in flight: mean staleness N - 1
        else:
            self.stage_delays, self.ranges = None, [(0, numel)]
            self.sampler = DelaySampler.from_config(delay, seed)
            horizons = [self.sampler.expected()]
        buffer = (max(self.stage_delays) if self.stage_delays else
                  0 if self.sampler is None else self.sampler.max)
        self.history = WeightHistory(buffer, numel, self.w.device, self.w.dtype)
        self.optimizer = DelayedOptimizer(optim, segment_sizes, horizons, self.w.device,
                                          self.w.dtype, ranges=self.ranges, matrices=matrices)
        self.t = 0

    def delays(self, t: int) -> list[int]:
        """Nominal delay of each stage (one entry without stages) at step t."""
        return self.stage_delays if self.stage_delays is not None else [self.sampler(t)]

    def step(self, grad_fn: Callable[[torch.Tensor], torch.Tensor], lr: float) -> list[int]:
        """One update; returns the staleness each stage's gradient had."""
        taus, w_fwd = self.begin(lr)
        self.finish(grad_fn(w_fwd), w_fwd, taus, lr)
        return taus

    def begin(self, lr: float) -> tuple[list[int], torch.Tensor]:
        """First half of a step: store this step's forward weights; return the actual staleness
        per stage, min(tau, t) (while the pipeline fills only w_0 exists), and the forward weights."""
        t, taus = self.t, self.delays(self.t)
        self.optimizer.store_forward_weights(self.w, lr, out=self.history.slot(t))
        if self.stage_delays is None:
            return [min(taus[0], t)], self.history.stale(t, taus[0])
        for (a, b), tau in zip(self.ranges, taus):
            self.w_fwd[a:b].copy_(self.history.stale(t, tau)[a:b])
        if self.backward_delays is not None:
            for (a, b), back in zip(self.ranges, self.backward_delays):
                self.w_bwd[a:b].copy_(self.w[a:b] if back == 0 else self.history.stale(t, back)[a:b])
            # the steps between each stage's forward and backward weights (fewer while filling)
            gaps = [min(d, t) - min(back, t) for d, back in zip(self.stage_delays, self.backward_delays)]
            self.optimizer.correct_backward_weights(self.w_bwd, gaps)
        return [min(tau, t) for tau in taus], self.w_fwd

    def finish(self, grad: torch.Tensor, w_fwd: torch.Tensor, taus: list[int], lr: float) -> None:
        """Second half: apply the gradient computed at ``w_fwd`` to the current weights."""
        self.optimizer.step(self.w, grad, w_fwd, taus, lr)
        self.t += 1

    def state_dict(self) -> dict:
        return {"t": self.t, "w": self.w, "history": self.history.buffer,
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.w.copy_(state["w"])
        self.history.buffer.copy_(state["history"])
        self.optimizer.load_state_dict(state["optimizer"])


class FlatParams:
    """Make a model's parameters (and their grads) views into one flat buffer each.

    Swapping the weights a forward pass sees is then one copy of P floats, not one per tensor;
    autograd accumulates into the existing ``.grad`` views in place. With ``channels_last``,
    4-d (convolution) weights are stored NHWC inside the flat buffer and exposed as
    channels_last-strided views, so convolutions need no layout conversion.
    """

    def __init__(self, model: nn.Module, channels_last: bool = False):
        params = [p for p in model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in params]
        nhwc = [channels_last and p.dim() == 4 for p in params]
        self.data = torch.cat([(p.detach().permute(0, 2, 3, 1) if cl else p.detach()).reshape(-1)
                               for p, cl in zip(params, nhwc)])
        self.grad = torch.zeros_like(self.data)
        offset = 0
        for p, n, cl in zip(params, self.sizes, nhwc):
            p.data = self._view(self.data[offset:offset + n], p.shape, cl)
            p.grad = self._view(self.grad[offset:offset + n], p.shape, cl)
            offset += n
        self.params = params

    @staticmethod
    def _view(segment: torch.Tensor, shape: torch.Size, nhwc: bool) -> torch.Tensor:
        if nhwc:
            n, c, h, w = shape
            return segment.view(n, h, w, c).permute(0, 3, 1, 2)
        return segment.view(shape)
