"""The quadratic oracle: simulated engine vs the analytic characteristic polynomial."""

import pytest

from abexp.stability import analytic_x_max, quadratic_optim_cfg, simulated_x_max

# DESIGN.md §1, computed independently: largest stable x for SGDM with m = 0.9
DESIGN_VALUES = {0: 3.8, 1: 0.1, 2: 0.0512, 4: 0.0265, 8: 0.0139, 16: 0.0075, 32: 0.0041}


@pytest.mark.parametrize("delay", sorted(DESIGN_VALUES))
def test_analytic_sgdm_matches_design_numbers(delay):
    assert analytic_x_max(delay, 0.9) == pytest.approx(DESIGN_VALUES[delay], rel=0.01)


def test_analytic_delay1_has_closed_form():
    # z^2 - (1+m) z + (m + x): roots on the unit circle when m + x = 1
    for m in (0.0, 0.5, 0.9):
        assert analytic_x_max(1, m) == pytest.approx(1 - m, rel=1e-3)


@pytest.mark.parametrize("delay", [0, 1, 4, 32])
def test_simulated_sgdm_matches_analytic_within_2_percent(delay):
    sim = simulated_x_max(quadratic_optim_cfg("sgdm", 0.9, 1.0), delay)
    assert sim == pytest.approx(analytic_x_max(delay, 0.9), rel=0.02)


def test_ab_is_stable_at_10x_sgdm_step_at_delay_32():
    ab = simulated_x_max(quadratic_optim_cfg("ab", 0.9, 1.0), 32)
    assert ab >= 10 * analytic_x_max(32, 0.9)


def test_ab_with_rho0_has_sgdm_stability():
    ab0 = simulated_x_max(quadratic_optim_cfg("ab", 0.9, 0.0), 4)
    assert ab0 == pytest.approx(analytic_x_max(4, 0.9), rel=0.02)
