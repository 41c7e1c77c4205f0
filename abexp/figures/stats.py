"""Student-t quantiles, paired t-intervals and the seeds a paired comparison needs, in plain
Python: scipy is not one of abexp's dependencies (pyproject.toml), and these are all the paired
table (abexp/figures/paired.py) needs.

* ``t_cdf`` is exact for integer degrees of freedom (Abramowitz & Stegun 26.7.3 and 26.7.4:
  finite sums in θ = atan(t/√ν)); ``t_quantile`` inverts it by bisection.
* ``paired_power`` is the power of the two-sided paired t-test, from the noncentral t written as
  an integral over the chi distribution of the sd estimate (Simpson's rule, good to 1e-6); ``seeds_for_power`` is the smallest n that reaches it.
* ``equivalence_power`` / ``seeds_for_equivalence``: the same for an equivalence claim, two
  one-sided paired t-tests (TOST) against a margin, when the true difference is 0.
* ``paired_t_p`` is the two-sided paired t-test's p-value; ``holm`` adjusts a table's p-values
  together (Holm 1979, step-down Bonferroni): a table of many rules and delays is many tests, and
  a referee asks which differences survive all of them at once.
tests/test_paired.py checks them against published table values and a simulation.
"""

from __future__ import annotations

import math
from statistics import NormalDist

_NORMAL = NormalDist()


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer ``df`` >= 1 degrees of freedom (exact series)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer (got {df})")
    df = int(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: A = 2/π [θ + sinθ (cosθ + 2/3 cos³θ + ...)]
        term, total = c, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            if k > 1:
                term *= c * c * (2 * k - 2) / (2 * k - 1)
            total += term
        a = 2.0 / math.pi * (theta + (s * total if df > 1 else 0.0))
    else:  # even: A = sinθ [1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ...]
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c * c * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return 0.5 + math.copysign(a / 2.0, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, by bisection on ``t_cdf`` (to 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1) (got {p})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-10:
            break
    return (low + high) / 2.0


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample sd, low, high): the two-sided t-interval of the mean, mean ± t·sd/√n with
    t the (1 + level)/2 quantile on n − 1 degrees of freedom; sd, low, high NaN for n < 2."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1.0 + level) / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def paired_t_p(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of the paired t-test that the true mean difference is 0, from the
    differences' mean, sample sd and count. NaN (no test) with fewer than 2 pairs, a non-finite
    mean (a diverged run's infinite loss) or no spread: equal differences (sd 0, or float noise
    below 1e-9 of the mean) make t infinite, a degenerate test, not the most significant one."""
    if n < 2 or not math.isfinite(mean) or not math.isfinite(sd) or sd <= 1e-9 * abs(mean):
        return math.nan
    return min(1.0, 2.0 * (1.0 - t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their own order: the i-th smallest
    of the m is multiplied by m − i + 1, kept monotone, capped at 1. A NaN (no test) stays NaN and
    is not counted in the family. Where the adjusted value is at most alpha, the whole family's
    chance of any false rejection is at most alpha."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p == p)
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def _chi_pdf(s: float, k: int) -> float:
    """Density of √V, V ~ χ²(k): smooth at 0 for every k >= 1 (V's own density is not for k = 1)."""
    if s <= 0.0:
        return 1.0 / (2 ** (k / 2 - 1) * math.gamma(k / 2)) if k == 1 else 0.0
    return math.exp((k - 1) * math.log(s) - s * s / 2 - (k / 2 - 1) * math.log(2) - math.lgamma(k / 2))


def paired_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired (one-sample) t-test at n pairs for a true mean difference of
    ``effect`` standard deviations of the differences: P(|T'| > t_crit), T' = (Z + δ√n)/(S/√ν),
    S = √V, V ~ χ²(ν), ν = n − 1, integrated over S (Simpson, 4,000 intervals over its bulk)."""
    if n < 2:
        return math.nan
    nu = n - 1
    crit = t_quantile(1.0 - alpha / 2.0, nu)
    shift = abs(effect) * math.sqrt(n)
    root = math.sqrt(nu)
    return min(1.0, _over_chi(nu, lambda s: _NORMAL.cdf(shift - crit * s / root) + _NORMAL.cdf(-shift - crit * s / root)))


def seeds_for_power(diff: float, sd: float, power: float = 0.8, alpha: float = 0.05,
                    most: int = 10_000) -> int | None:
    """The fewest paired seeds for which a two-sided paired t-test at ``alpha`` detects a true mean
    difference ``diff`` with this ``power``, when the per-seed differences have sd ``sd``; None
    when there is no difference (or no spread estimate) or more than ``most`` would be needed."""
    if not (sd == sd and diff == diff) or diff == 0:
        return None
    if sd == 0:
        return 2  # no spread: any two seeds show it
    effect = abs(diff) / sd
    z = _NORMAL.inv_cdf(1 - alpha / 2) + _NORMAL.inv_cdf(power)
    return _fewest(lambda n: paired_power(effect, n, alpha), math.ceil((z / effect) ** 2), power, most)


def _fewest(power_at, guess: int, power: float, most: int) -> int | None:
    """The smallest n >= 2 with power_at(n) >= power: start at the normal approximation's
    ``guess``, then walk to the exact answer (power grows with n); None beyond ``most``."""
    n = max(2, guess)
    if n > most:
        return None
    while n > 2 and power_at(n - 1) >= power:
        n -= 1
    while power_at(n) < power:
        n += 1
        if n > most:
            return None
    return n


def _over_chi(nu: int, inner) -> float:
    """E[inner(S)] for S = √V, V ~ χ²(ν): Simpson's rule, 4,000 intervals over S's bulk."""
    hi = math.sqrt(nu) + 10.0  # S has mean ≈ √ν and sd < 0.71: beyond 10 is below 1e-20
    steps = 4000
    h = hi / steps
    total = 0.0
    for i in range(steps + 1):
        s = i * h
        weight = 1 if i in (0, steps) else 4 if i % 2 else 2
        total += weight * inner(s) * _chi_pdf(s, nu)
    return total * h / 3.0


def equivalence_power(margin: float, n: int, alpha: float = 0.05) -> float:
    """Power of two one-sided paired t-tests at ``alpha`` each (TOST; equivalently, the
    (1 − 2α) t-interval inside ±margin) at n pairs when the true mean difference is 0 and
    ``margin`` is in standard deviations of the differences: P(|d̄| < margin − t·S/√n) with
    d̄ ~ N(0, 1/n), S = √(V/ν), V ~ χ²(ν), ν = n − 1."""
    if n < 2:
        return math.nan
    nu = n - 1
    crit = t_quantile(1.0 - alpha, nu)
    root = math.sqrt(n)
    return min(1.0, _over_chi(nu, lambda s: max(0.0, 2.0 * _NORMAL.cdf(margin * root - crit * s / math.sqrt(nu)) - 1.0)))


def seeds_for_equivalence(margin: float, sd: float, power: float = 0.8, alpha: float = 0.05,
                          most: int = 10_000) -> int | None:
    """The fewest paired seeds for which TOST at ``alpha`` shows equivalence within ±``margin``
    with this ``power`` when the true difference is 0 and the per-seed differences have sd
    ``sd``; None without a spread estimate or beyond ``most``."""
    if not (sd == sd and margin > 0):
        return None
    if sd == 0:
        return 2
    effect = margin / sd
    z = _NORMAL.inv_cdf(1 - alpha) + _NORMAL.inv_cdf(1 - (1 - power) / 2)
    return _fewest(lambda n: equivalence_power(effect, n, alpha), math.ceil((z / effect) ** 2), power, most)
