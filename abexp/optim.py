"""Update rules for delayed gradients, on flat parameter vectors (DESIGN.md §1).

All rules are one class because they compose: AB scales the gradient, DC-ASGD corrects it,
spike compensation changes how velocity and gradient enter the step, linear weight prediction
changes which weights the gradient is computed at, and the staleness-aware rate divides the
step size. Every operation is on the whole flat vector (one kernel per op, not one per tensor).

    g   = grad(w_fwd) + wd * (w | w_fwd)                      weight decay on current or stale weights
    g  += lambda_dc * g * g * (w - w_fwd)                      DC-ASGD
    g  *= 1 - rho * cos(g, v)                                  Adaptive Braking (per tensor or global)
    v   = m v + g
    w  -= eta (a v + b g),  a = m^tau, b = (1 - m^tau)/(1 - m) spike compensation (a=1, b=0 without)
    w  -= eta (g + m v)                                        Nesterov instead of the line above
    eta = lr / max(1, tau)                                     staleness-aware lr (salr)
    stored forward weights: w - eta_s * H * v                  linear weight prediction (lwp)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abexp.config import OptimCfg


@dataclass(frozen=True)
class Mitigations:
    ab: bool = False
    sc: bool = False
    lwp: bool = False
    dc: bool = False
    salr: bool = False


OPTIMIZERS: dict[str, Mitigations] = {
    "sgdm": Mitigations(),
    "ab": Mitigations(ab=True),
    "sc": Mitigations(sc=True),
    "lwp": Mitigations(lwp=True),
    "dcasgd": Mitigations(dc=True),
    "salr": Mitigations(salr=True),
    "ab_lwp": Mitigations(ab=True, lwp=True),
    "sc_lwp": Mitigations(sc=True, lwp=True),
}


def segment_cosine(g: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """cos(g, v) per contiguous segment (one per parameter tensor), or one global value.

    Defined as 0 where either norm is 0 (e.g. the first step, when v = 0). ``unsafe=True``
    skips segment_reduce's validation of ``lengths`` (two host reads per call, a GPU sync each);
    the lengths are the parameter sizes, valid by construction.
    """
    if lengths is None:
        dot, gg, vv = (g * v).sum(), (g * g).sum(), (v * v).sum()
    else:
        dot = torch.segment_reduce(g * v, "sum", lengths=lengths, unsafe=True)
        gg = torch.segment_reduce(g * g, "sum", lengths=lengths, unsafe=True)
        vv = torch.segment_reduce(v * v, "sum", lengths=lengths, unsafe=True)
    denom = (gg * vv).sqrt()
    return torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(dot))


class DelayedOptimizer:
    """Momentum SGD and its delay mitigations on one flat weight vector."""

    def __init__(self, cfg: OptimCfg, segment_sizes: list[int], lwp_horizon: float, device,
                 dtype=torch.float32):
        self.cfg, self.rules = cfg, OPTIMIZERS[cfg.name]
        numel = sum(segment_sizes)
        self.v = torch.zeros(numel, device=device, dtype=dtype)
        self.lwp_horizon = lwp_horizon if cfg.lwp_horizon is None else cfg.lwp_horizon
        self.lengths = None
        if self.rules.ab and cfg.ab_cosine == "tensor":
            self.lengths = torch.tensor(segment_sizes, device=device, dtype=torch.long)

    def step_size(self, lr: float, tau: int) -> float:
        return lr / max(1, tau) if self.rules.salr else lr

    def store_forward_weights(self, w: torch.Tensor, lr: float, out: torch.Tensor) -> None:
        """Write the weights the gradient of this step's batch will later be computed at."""
        if self.rules.lwp and self.lwp_horizon > 0:
            torch.add(w, self.v, alpha=-lr * self.lwp_horizon, out=out)
        else:
            out.copy_(w)

    def step(self, w: torch.Tensor, grad: torch.Tensor, w_fwd: torch.Tensor, tau: int,
             lr: float) -> None:
        """Apply one update to ``w`` in place; ``grad`` is consumed (modified in place)."""
        cfg, rules, v = self.cfg, self.rules, self.v
        m, eta = cfg.momentum, self.step_size(lr, tau)
        g = grad
        if cfg.weight_decay:
            g.add_(w if cfg.weight_decay_on == "current" else w_fwd, alpha=cfg.weight_decay)
        if rules.dc and cfg.dc_lambda and tau > 0:
            g.addcmul_(g * g, w - w_fwd, value=cfg.dc_lambda)
        if rules.ab and cfg.rho:
            cos = segment_cosine(g, v, self.lengths)
            scale = 1.0 - cfg.rho * cos
            if self.lengths is not None:
                scale = scale.repeat_interleave(self.lengths, output_size=g.numel())
            g.mul_(scale)
        v.mul_(m).add_(g)
        if rules.sc and tau > 0:
            a, b = m ** tau, (1.0 - m ** tau) / (1.0 - m)
            w.add_(v, alpha=-eta * a).add_(g, alpha=-eta * b)
        elif cfg.nesterov:
            w.add_(g.add_(v, alpha=m), alpha=-eta)
        else:
            w.add_(v, alpha=-eta)

    def state_dict(self) -> dict:
        return {"v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.v.copy_(state["v"])
