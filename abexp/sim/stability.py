"""The convex quadratic oracle: the largest stable x = eta * lambda_max per optimizer and delay.

On f(w) = 1/2 sum_i lambda_i w_i^2 delayed SGDM is linear, with characteristic polynomial
    z^(D+1) - (1+m) z^D + m z^(D-1) + x = 0   (D >= 1;  D = 0: z^2 - (1+m-x) z + m = 0)
and is stable iff every root lies inside the unit circle. The simulated value comes from the
same DelayedSGD engine and update rules that train the ResNets (not a re-implementation),
with gradient lambda * w_fwd, bisected over x.
"""

from __future__ import annotations

import numpy as np
import torch

from abexp.config import DelayCfg, OptimCfg
from abexp.sim.engine import DelayedSGD


def analytic_roots_max(x: float, delay: int, momentum: float) -> float:
    m = momentum
    if delay == 0:
        coeffs = [1.0, -(1.0 + m - x), m]
    else:  # z^(D+1) - (1+m) z^D + m z^(D-1) + x; for D = 1 the last two terms share z^0
        coeffs = [0.0] * (delay + 2)
        coeffs[0] += 1.0
        coeffs[1] -= 1.0 + m
        coeffs[2] += m
        coeffs[-1] += x
    return float(np.abs(np.roots(coeffs)).max())


def bisect(stable, lo: float, hi: float, rel_tol: float) -> float:
    """Largest x with stable(x), assuming stability is monotone in x; grows hi if needed."""
    while stable(hi) and hi < 1e3:
        lo, hi = hi, hi * 2.0
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo


def analytic_x_max(delay: int, momentum: float, rel_tol: float = 1e-4) -> float:
    return bisect(lambda x: analytic_roots_max(x, delay, momentum) < 1.0, 0.0, 4.0, rel_tol)


def simulate_stable(optim: OptimCfg, delay: int, x: float, steps: int = 3000,
                    n_eigen: int = 50) -> bool:
    """Run the engine on the quadratic with eigenvalues evenly spread on [0.01, 1] * lambda_max."""
    lam = torch.linspace(0.01, 1.0, n_eigen, dtype=torch.float64)
    w0 = torch.ones(n_eigen, dtype=torch.float64)
    engine = DelayedSGD(w0, [n_eigen], optim, DelayCfg(kind="constant", steps=delay), seed=0)
    return _stable_trajectory(engine, lam, x, steps)


def _stable_trajectory(engine: DelayedSGD, lam: torch.Tensor, x: float, steps: int) -> bool:
    """Stable: the weights stay finite, and their largest norm over the last ``window`` steps is
    below the starting norm and below the largest norm over the ``window`` steps before the
    half-way point (window maxima, so an oscillation's phase cannot fool the comparison)."""
    start = float(engine.w.norm())
    window = max(1, min(200, steps // 4))
    mid_max = end_max = 0.0
    for t in range(steps):
        engine.step(lambda w_fwd: lam * w_fwd, x)
        if steps // 2 - window <= t < steps // 2 or t >= steps - window:
            norm = float(engine.w.norm())
            if not np.isfinite(norm):
                return False
            if t < steps // 2:
                mid_max = max(mid_max, norm)
            else:
                end_max = max(end_max, norm)
    return end_max < start and end_max < mid_max


def quadratic_optim_cfg(name: str, momentum: float, rho: float, **extra) -> OptimCfg:
    return OptimCfg(name=name, lr=1.0, momentum=momentum, rho=rho, weight_decay=0.0, **extra)


def simulated_x_max(optim: OptimCfg, delay: int, steps: int = 3000, rel_tol: float = 0.005) -> float:
    return bisect(lambda x: simulate_stable(optim, delay, x, steps), 0.0, 4.0, rel_tol)


def stability_table(optims: list[str], delays: list[int], momentum: float = 0.9,
                    rho: float = 1.0, steps: int = 3000, progress=None) -> list[dict]:
    rows = []
    for name in optims:
        cfg = quadratic_optim_cfg(name, momentum, rho)
        for d in delays:
            rows.append({"optim": name, "rho": rho, "momentum": momentum, "delay": d,
                         "x_max": simulated_x_max(cfg, d, steps),
                         "sgdm_analytic": analytic_x_max(d, momentum)})
            if progress:
                progress(rows[-1])
    return rows


# ---------------------------------------------------------------- pipeline stages on the quadratic

def stage_layout(n_eigen: int, stages: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Eigenvalues ordered so that S contiguous blocks each span the whole spectrum (direction i
    goes to stage i mod S), and the blocks' element ranges. Each block is one 'tensor' for AB's
    per-tensor cosine, in the pipeline and in the constant-delay comparison alike."""
    lam = torch.linspace(0.01, 1.0, n_eigen, dtype=torch.float64)
    order = [i for s in range(stages) for i in range(s, n_eigen, stages)]
    sizes = [len(range(s, n_eigen, stages)) for s in range(stages)]
    bounds = np.cumsum([0] + sizes).tolist()
    return lam[order], list(zip(bounds[:-1], bounds[1:]))


def pipeline_sgdm_analytic(stages: int, momentum: float, n_eigen: int = 50) -> float:
    """Exact pipeline SGDM limit: each direction is scalar delayed SGDM with its stage's delay,
    stable iff x * lam_i / lam_max < x_max(D_s); the pipeline is stable iff all are."""
    from abexp.sim.pipeline import profile_delays
    lam, ranges = stage_layout(n_eigen, stages)
    return min(analytic_x_max(d, momentum) / float(lam[a:b].max())
               for (a, b), d in zip(ranges, profile_delays(stages)))


def simulate_stages(optim: OptimCfg, stages: int, kind: str, x: float, steps: int = 3000,
                    n_eigen: int = 50) -> bool:
    """Stability with S stages: per-stage delays 2(S-1-s) (``pipeline``) or every stage at the
    first stage's delay 2(S-1) (``constant``)."""
    lam, ranges = stage_layout(n_eigen, stages)
    delay = (DelayCfg(kind="pipeline", stages=stages) if kind == "pipeline"
             else DelayCfg(kind="constant", steps=2 * (stages - 1)))
    engine = DelayedSGD(torch.ones(n_eigen, dtype=torch.float64), [b - a for a, b in ranges], optim,
                        delay, seed=0, stages=ranges if kind == "pipeline" else None)
    return _stable_trajectory(engine, lam, x, steps)


def pipeline_table(optims: list[str], stage_counts: list[int], momentum: float = 0.9,
                   rho: float = 1.0, steps: int = 3000, progress=None) -> list[dict]:
    rows = []
    for name in optims:
        cfg = quadratic_optim_cfg(name, momentum, rho)
        for s in stage_counts:
            for kind in ("pipeline", "constant"):
                x = bisect(lambda v: simulate_stages(cfg, s, kind, v, steps), 0.0, 4.0, 0.005)
                rows.append({"optim": name, "rho": rho, "momentum": momentum, "stages": s, "kind": kind,
                             "delay": 2 * (s - 1), "x_max": x,
                             "sgdm_analytic": (pipeline_sgdm_analytic(s, momentum) if kind == "pipeline"
                                               else analytic_x_max(2 * (s - 1), momentum))})
                if progress:
                    progress(rows[-1])
    return rows
