"""The delay engine: one delayed optimisation step, for a ResNet or for the quadratic oracle.

``DelayedSGD.step(grad_fn, lr)`` is the single code path both use: store this step's forward
weights in the ring buffer, pick the stale weights of step t - tau_t, ask ``grad_fn`` for the
gradient there, and let the optimizer apply it to the current weights.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from abexp.config import DelayCfg, OptimCfg
from abexp.delay import DelaySampler, WeightHistory
from abexp.optim import DelayedOptimizer


class DelayedSGD:
    """Current weights ``w``, the forward-weight history, the delay draws and the update rule."""

    def __init__(self, w0: torch.Tensor, segment_sizes: list[int], optim: OptimCfg,
                 delay: DelayCfg, seed: int):
        self.w = w0.detach().clone()
        self.sampler = DelaySampler(delay.kind, delay.steps, delay.mean,
                                    seed if delay.seed is None else delay.seed)
        self.history = WeightHistory(delay.steps, self.w.numel(), self.w.device, self.w.dtype)
        self.optimizer = DelayedOptimizer(optim, segment_sizes, self.sampler.expected(),
                                          self.w.device, self.w.dtype)
        self.t = 0

    def step(self, grad_fn: Callable[[torch.Tensor], torch.Tensor], lr: float) -> int:
        """One update; returns the delay tau_t that was used."""
        tau, w_fwd = self.begin(lr)
        self.finish(grad_fn(w_fwd), w_fwd, tau, lr)
        return tau

    def begin(self, lr: float) -> tuple[int, torch.Tensor]:
        """First half of a step: store this step's forward weights, return (tau, stale weights)."""
        t, tau = self.t, self.sampler(self.t)
        self.optimizer.store_forward_weights(self.w, lr, out=self.history.slot(t))
        return tau, self.history.stale(t, tau)

    def finish(self, grad: torch.Tensor, w_fwd: torch.Tensor, tau: int, lr: float) -> None:
        """Second half: apply the gradient computed at ``w_fwd`` to the current weights."""
        self.optimizer.step(self.w, grad, w_fwd, tau, lr)
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
