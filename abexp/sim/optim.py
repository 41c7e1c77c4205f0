"""Update rules for delayed gradients, on flat parameter vectors (docs/science.md §1).

All rules are one class because they compose: AB scales the gradient, DC-ASGD corrects it,
spike compensation changes how velocity and gradient enter the step, linear weight prediction
changes which weights the gradient is computed at, and the staleness-aware rate divides the
step size. Every operation is on the whole flat vector (one kernel per op, not one per tensor);
only the rules that depend on the staleness loop over the stages (one range without stages).

    g   = grad(w_fwd)                                          the delayed loss gradient
    c   = lambda_dc * g * g * (w - w_fwd)                      DC-ASGD (on the loss gradient only)
    g  += wd * (w | w_fwd) + c                                 weight decay on current or stale weights
    g  *= 1 - rho * cos(g, v)                                  Adaptive Braking (per tensor or global)
    v   = m v + g
    w  -= eta (a v + b g),  a = m^tau, b = (1 - m^tau)/(1 - m) spike compensation (a=1, b=0 without)
    w  -= eta (g + m v)                                        Nesterov instead of the line above
    eta = lr / max(1, tau)                                     staleness-aware lr (salr)
    eta = lr * M / max(M, tau),  M = max(1, tau_C)             delay-adaptive step (Mishchenko et al. 2022)
    eta = lr * max(1, tau)^-p,  p = max(0, 1 - k / K)          PipeMare's lr rescheduling (Yang et al. 2021)
    skip the update if tau > tau_D, tau_D = 2 E[tau]            delay threshold (Koloskova et al. 2022):
          (w and v unchanged)                                     a stale gradient is discarded
    g   = mean of the last M loss gradients, every M-th step    ADL's accumulation (Zhuang et al. 2020);
          (no update in between)                                  the other steps leave w and v as they are
    g  /= 1 + |w - w_fwd| / C,                                 Gap-Aware (Barkai et al. 2020), per element,
          C = lr_max (sqrt(EMA_0.999(v^2) / (1 - 0.999^k)) + 1e-8)   from v before this step
    stored forward weights: w - eta_s * H * v                  linear weight prediction (lwp)
          H = D, or (m - m^(D+1)) / (1 - m) with                  (D: the horizon, lwp_horizon or the
          optim.lwp_lookahead: momentum (FTPipe's msnag)          stage's expected delay)
    lambda_dc = lambda_0 / sqrt(MS + 1e-7),                     DC-ASGD's adaptive variant (DC-ASGD-a,
          MS = 0.95 MS + 0.05 g^2 (per element, every step)       optim.dc_adaptive)
    backward weights: w_bwd - (D_s - b_s) * delta,             PipeMare's discrepancy correction
          delta = gamma delta + (1 - gamma)(w_new - w_old)        (an unstashed pipeline only)

tau is a stage's actual staleness, min(D, t) while the pipeline fills. The Adam family follows
torch.optim.Adam / AdamW exactly; with AB the gradient is scaled by 1 - rho cos(g, m), m Adam's
first moment, before it enters both moments. Muon (``muon``, ``ab_muon``: abexp/sim/muon.py)
follows torch.optim.Muon on the hidden matrices and AdamW on the rest; with AB the gradient is
scaled by 1 - rho cos(g, B), B Muon's momentum buffer (AdamW's m elsewhere), before it enters
the momentum, so before the orthogonalisation. Weight prediction for these rules (``lwp_adam``,
``lwp_adamw``, ``lwp_muon``) cannot use lr * v, which is not their step: it stores
w - H * delta, delta = w_prev - w the last applied update (0 before the first), H the horizon;
DC-ASGD (``dcasgd_adam``, ``dcasgd_adamw``, ``dcasgd_muon``) corrects g as for SGDM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from abexp.config import OptimCfg
from abexp.registry import RULES
from abexp.sim.brake import BrakeLog
from abexp.sim.segments import Segments

DC_MS_DECAY, DC_MS_EPS = 0.95, 1e-7  # DC-ASGD-a: MeanSquare's decay and the epsilon under its root


@dataclass(frozen=True)
class Mitigations:
    ab: bool = False
    sc: bool = False
    lwp: bool = False
    dc: bool = False
    salr: bool = False
    gap_aware: bool = False
    delay_adaptive: bool = False
    pipemare_lr: bool = False
    discrepancy: bool = False  # PipeMare's discrepancy correction of the backward weights
    accumulate: bool = False  # ADL
    drop_stale: bool = False  # discard gradients staler than a threshold (Koloskova et al. 2022)
    adam: bool = False
    decoupled_wd: bool = False  # AdamW
    muon: bool = False  # Muon on the hidden matrices, AdamW on the rest (abexp/sim/muon.py)


def mitigations(name: str) -> Mitigations:
    """The flags rule ``name`` switches on: its record in abexp.registry.RULES (abexp.sim.rules
    holds the built-in ones)."""
    flags = RULES.get(name).flags
    unknown = sorted(flags - set(Mitigations.__dataclass_fields__))
    if unknown:
        raise ValueError(f"update rule {name!r}: unknown flag {unknown[0]!r} (flags: "
                         f"{', '.join(Mitigations.__dataclass_fields__)})")
    return Mitigations(**dict.fromkeys(flags, True))


def segment_cosine(g: torch.Tensor, v: torch.Tensor, segments: Segments | None,
                   scratch: torch.Tensor | None = None) -> torch.Tensor:
    """cos(g, v) per contiguous segment (one per parameter tensor), or one global value.

    Defined as 0 where either norm is 0 (e.g. the first step, when v = 0). Per segment, the
    three products go into ``scratch`` ([3, *g.shape], allocated when None) and are summed in
    one pass (abexp.sim.segments: a fixed number of tensor operations, no host read). ``g`` and
    ``v`` may carry leading batch dimensions ([K, P]: K packed runs); the result is then [K, S].
    """
    if segments is None:
        dot, gg, vv = (g * v).sum(), (g * g).sum(), (v * v).sum()
    else:
        prod = torch.empty((3, *g.shape), device=g.device, dtype=g.dtype) if scratch is None else scratch
        torch.mul(g, v, out=prod[0])
        torch.mul(g, g, out=prod[1])
        torch.mul(v, v, out=prod[2])
        dot, gg, vv = segments.sums(prod).unbind(0)
    denom = gg.sqrt() * vv.sqrt()  # not sqrt(gg * vv): the product under- or overflows
    return torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(dot))


class DelayedOptimizer:
    """Momentum SGD (or Adam) and the delay mitigations on one flat weight vector.

    ``ranges`` are the element ranges of the stages (one range without per-stage delays) and
    ``horizons`` their default weight-prediction look-ahead (the stage's expected delay).
    """

    def __init__(self, cfg: OptimCfg, segment_sizes: list[int], horizons: list[float], device,
                 dtype=torch.float32, ranges: list[tuple[int, int]] | None = None,
                 matrices: list[tuple[int, int] | None] | None = None):
        self.cfg, self.rules = cfg, mitigations(cfg.name)
        # a plugin rule's own step on the delayed gradient (abexp.register_rule), and its state
        self.transform = RULES.get(cfg.name).grad_transform
        self.transform_state: dict = {}
        numel = sum(segment_sizes)
        self.ranges = ranges or [(0, numel)]
        self.v = torch.zeros(numel, device=device, dtype=dtype)  # velocity; Adam: first moment
        self.second = torch.zeros(numel, device=device, dtype=dtype) if self.rules.adam else None
        self.muon = None  # muon rules: per segment its (rows, cols) if Muon updates it (``matrices``)
        if self.rules.muon:
            from abexp.sim.muon import MuonUpdate
            if matrices is None:
                raise ValueError(f"rule {cfg.name} needs the parameters' shapes (abexp.sim.muon.muon_matrices)")
            self.muon = MuonUpdate(cfg, segment_sizes, matrices, device, dtype)
        # weight prediction for Adam and Muon: the last applied update, w_prev - w
        self.last_update = (torch.zeros(numel, device=device, dtype=dtype)
                            if self.rules.lwp and (self.rules.adam or self.rules.muon) else None)
        self.updates = 0  # Adam's bias-correction step count
        self.horizons = [h if cfg.lwp_horizon is None else cfg.lwp_horizon for h in horizons]
        # LWP's multiple of lr·v per stage: the horizon D (linear), or the distance momentum alone
        # would carry the weights in D steps, Σ_{k=1..D} m^k = (m − m^(D+1))/(1 − m) (FTPipe's msnag)
        m = cfg.momentum
        self.lookahead = [h if cfg.lwp_lookahead == "linear" else (m - m ** (h + 1)) / (1.0 - m)
                          for h in self.horizons]
        # DC-ASGD-a: the per-element mean square of the loss gradient that scales lambda
        self.dc_ms = torch.zeros(numel, device=device, dtype=dtype) if self.rules.dc and cfg.dc_adaptive else None
        self.brake_log = BrakeLog(device) if self.rules.ab else None  # abexp.sim.brake
        # delay-adaptive step: M per stage, tau_C or the stage's expected delay, at least 1
        self.tau_c = [max(1.0, h if cfg.tau_c is None else cfg.tau_c) for h in horizons]
        # drop_stale: per stage, the staleness above which a gradient is discarded
        self.drop_above = [2.0 * h if cfg.drop_above is None else cfg.drop_above for h in horizons]
        # Gap-Aware: EMA of v^2 per element, its update count, the largest lr seen (FTPipe's max_lr)
        self.gap_avg = torch.zeros(numel, device=device, dtype=dtype) if self.rules.gap_aware else None
        self.gap_updates, self.max_lr = 0, 0.0
        self.steps = 0  # steps taken (PipeMare's k)
        # ADL: the loss gradients accumulated since the last update, and how many
        self.accumulated = torch.zeros(numel, device=device, dtype=dtype) if self.rules.accumulate else None
        self.accumulated_count = 0
        # PipeMare's discrepancy correction: EMA of the per-step weight change
        self.delta = torch.zeros(numel, device=device, dtype=dtype) if self.rules.discrepancy else None
        self.segments, self._ab_scratch = None, None
        if self.rules.ab and cfg.ab_cosine == "tensor":
            self.segments = Segments(segment_sizes, device)

    def step_size(self, lr: float, tau: int, stage: int = 0) -> float:
        if self.rules.salr:
            return lr / max(1, tau)
        if self.rules.delay_adaptive:
            m = self.tau_c[stage]
            return lr * m / max(m, tau)
        if self.rules.pipemare_lr:  # self.steps: this step's k (counted before the update)
            anneal = self.cfg.pipemare_anneal_steps
            p = max(0.0, 1.0 - self.steps / anneal) if anneal else 0.0
            return lr * max(1, tau) ** -p
        return lr

    def _gap_penalty(self, g: torch.Tensor, w: torch.Tensor, w_fwd: torch.Tensor, lr: float) -> None:
        """Gap-Aware, as FTPipe implements it (pipe/pipeline/gap_aware/sgd_gap_aware.py): the
        gradient (weight decay included) divided per element by 1 + gap / C, the gap being how
        far the weights moved since the forward pass and C the typical step, lr_max * RMS(v),
        from the velocity before this step. No gap (no delay) leaves g untouched."""
        beta, eps = self.cfg.gap_gamma, self.cfg.gap_eps
        self.max_lr = max(self.max_lr, lr)
        self.gap_updates += 1
        self.gap_avg.mul_(beta).addcmul_(self.v, self.v, value=1.0 - beta)
        typical = (self.gap_avg / (1.0 - beta ** self.gap_updates)).sqrt_().add_(eps).mul_(self.max_lr)
        g.div_((w - w_fwd).abs_().div_(typical).add_(1.0))

    def store_forward_weights(self, w: torch.Tensor, lr: float, out: torch.Tensor) -> None:
        """Write the weights the gradient of this step's batch will later be computed at."""
        if not self.rules.lwp:
            out.copy_(w)
            return
        for (a, b), horizon, ahead in zip(self.ranges, self.horizons, self.lookahead):
            if horizon > 0 and self.last_update is not None:  # Adam, Muon: along the last update
                torch.add(w[a:b], self.last_update[a:b], alpha=-horizon, out=out[a:b])
            elif horizon > 0:
                torch.add(w[a:b], self.v[a:b], alpha=-lr * ahead, out=out[a:b])
            else:
                out[a:b].copy_(w[a:b])

    def correct_backward_weights(self, w_bwd: torch.Tensor, gaps: list[int]) -> None:
        """PipeMare's discrepancy correction: move each stage's backward weights back towards
        its (older) forward weights by the gap in steps times the recent per-step change."""
        if self.delta is None:
            return
        for (a, b), gap in zip(self.ranges, gaps):
            if gap > 0:
                w_bwd[a:b].add_(self.delta[a:b], alpha=-float(gap))

    def _brake(self, g: torch.Tensor, direction: torch.Tensor) -> None:
        """Adaptive Braking: g *= 1 - rho cos(g, direction), per tensor or global."""
        if self.segments is None:
            scale = 1.0 - self.cfg.rho * segment_cosine(g, direction, None)
            self.brake_log.record(scale)  # read out per epoch (abexp.sim.brake), never applied
            g.mul_(scale)
            return
        if self._ab_scratch is None:  # kept: a fresh 3P buffer per step costs its page faults
            self._ab_scratch = torch.empty((3, *g.shape), device=g.device, dtype=g.dtype)
        scale = 1.0 - self.cfg.rho * segment_cosine(g, direction, self.segments, self._ab_scratch)
        self.brake_log.record(scale)
        self.segments.scale_(g, scale)

    def step(self, w: torch.Tensor, grad: torch.Tensor, w_fwd: torch.Tensor, taus: list[int],
             lr: float) -> None:
        """Apply one update to ``w`` in place; ``grad`` is consumed (modified in place).
        ``taus``: the actual staleness of each stage's gradient."""
        cfg, rules, v = self.cfg, self.rules, self.v
        g = grad
        if rules.accumulate:  # ADL: one update from the mean of every adl_steps loss gradients
            self.accumulated.add_(grad)
            self.accumulated_count += 1
            if self.accumulated_count < cfg.adl_steps:
                return
            g = grad.copy_(self.accumulated).div_(cfg.adl_steps)
            self.accumulated.zero_()
            self.accumulated_count = 0
        correction = None
        if self.dc_ms is not None:  # every step, delayed or not: the paper's running MeanSquare
            self.dc_ms.mul_(DC_MS_DECAY).addcmul_(g, g, value=1.0 - DC_MS_DECAY)
        if rules.dc and cfg.dc_lambda and max(taus) > 0:
            correction = (g * g).mul_(w - w_fwd).mul_(cfg.dc_lambda)
            if self.dc_ms is not None:  # lambda_t = lambda_0 / sqrt(MeanSquare + eps), per element
                correction.div_(self.dc_ms.add(DC_MS_EPS).sqrt_())
        if cfg.weight_decay and not rules.decoupled_wd:
            g.add_(w if cfg.weight_decay_on == "current" else w_fwd, alpha=cfg.weight_decay)
        if correction is not None:
            g.add_(correction)
        if rules.gap_aware:
            self._gap_penalty(g, w, w_fwd, lr)
        if rules.ab and cfg.rho:
            self._brake(g, v)
        if self.transform is not None:
            self.transform(g, w, w_fwd, taus, lr, self.transform_state)
        if self.muon is not None or rules.adam:
            before = w.clone() if self.last_update is not None else None
            if self.muon is not None:
                self.muon.step(w, g, v, lr)
            else:
                self._adam(w, g, lr)
            if before is not None:
                torch.sub(before, w, out=self.last_update)
            return
        m = cfg.momentum
        before = w.clone() if self.delta is not None else None
        dropped = [rules.drop_stale and tau > limit for tau, limit in zip(taus, self.drop_above)]
        kept_v = [v[a:b].clone() if drop else None for (a, b), drop in zip(self.ranges, dropped)]
        v.mul_(m).add_(g)
        for stage, ((a, b), tau) in enumerate(zip(self.ranges, taus)):
            if dropped[stage]:  # discarded: this stage's weights and velocity stay as they were
                v[a:b].copy_(kept_v[stage])
                continue
            eta = self.step_size(lr, tau, stage)
            if rules.sc and tau > 0:
                sc_a, sc_b = m ** tau, (1.0 - m ** tau) / (1.0 - m)
                w[a:b].add_(v[a:b], alpha=-eta * sc_a).add_(g[a:b], alpha=-eta * sc_b)
            elif cfg.nesterov:
                w[a:b].add_(g[a:b].add_(v[a:b], alpha=m), alpha=-eta)
            else:
                w[a:b].add_(v[a:b], alpha=-eta)
        if before is not None:
            gamma = cfg.pipemare_gamma
            self.delta.mul_(gamma).add_(w - before, alpha=1.0 - gamma)
        self.steps += 1

    def _adam(self, w: torch.Tensor, g: torch.Tensor, lr: float) -> None:
        """torch.optim.Adam / AdamW's update, operation for operation."""
        beta1, beta2 = self.cfg.betas
        if self.rules.decoupled_wd and self.cfg.weight_decay:
            w.mul_(1.0 - lr * self.cfg.weight_decay)
        self.updates += 1
        self.v.lerp_(g, 1.0 - beta1)
        self.second.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1 ** self.updates, 1.0 - beta2 ** self.updates
        denom = (self.second.sqrt() / math.sqrt(bias2)).add_(self.cfg.eps)
        w.addcdiv_(self.v, denom, value=-lr / bias1)

    def state_dict(self) -> dict:
        state = {"v": self.v}
        if self.second is not None:
            state.update(second=self.second, updates=self.updates)
        if self.muon is not None:
            state.update(muon=self.muon.state_dict())
        if self.last_update is not None:
            state.update(last_update=self.last_update)
        if self.gap_avg is not None:
            state.update(gap_avg=self.gap_avg, gap_updates=self.gap_updates, max_lr=self.max_lr)
        if self.rules.pipemare_lr:
            state.update(steps=self.steps)
        if self.accumulated is not None:
            state.update(accumulated=self.accumulated, accumulated_count=self.accumulated_count)
        if self.delta is not None:
            state.update(delta=self.delta)
        if self.dc_ms is not None:
            state.update(dc_ms=self.dc_ms)
        if self.brake_log is not None:
            state.update(brake=self.brake_log.state_dict())
        if self.transform is not None:
            state.update(transform=dict(self.transform_state))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.v.copy_(state["v"])
        if self.second is not None:
            self.second.copy_(state["second"])
            self.updates = int(state["updates"])
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
        if self.last_update is not None:
            self.last_update.copy_(state["last_update"])
        if self.gap_avg is not None:
            self.gap_avg.copy_(state["gap_avg"])
            self.gap_updates, self.max_lr = int(state["gap_updates"]), float(state["max_lr"])
        if self.rules.pipemare_lr:
            self.steps = int(state["steps"])
        if self.accumulated is not None:
            self.accumulated.copy_(state["accumulated"])
            self.accumulated_count = int(state["accumulated_count"])
        if self.delta is not None:
            self.delta.copy_(state["delta"])
        if self.dc_ms is not None:
            self.dc_ms.copy_(state["dc_ms"])
        if self.brake_log is not None and "brake" in state:  # absent in checkpoints from before it
            self.brake_log.load_state_dict(state["brake"])
        if self.transform is not None:
            self.transform_state.clear()
            self.transform_state.update(state.get("transform", {}))
