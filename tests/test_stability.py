"""The quadratic oracle: simulated engine vs the analytic characteristic polynomial."""

import pytest

from abexp.sim.stability import analytic_x_max, quadratic_optim_cfg, simulated_x_max

# docs/science.md §1, computed independently: largest stable x for SGDM with m = 0.9
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


def test_pipeline_sgdm_matches_its_exact_limit_and_one_stage_is_undelayed():
    """Per-stage delays on the quadratic: simulated SGDM against the exact per-direction limit
    (each direction is scalar delayed SGDM with its stage's delay); S = 1 is delay 0."""
    from abexp.sim.stability import pipeline_table
    rows = {(r["stages"], r["kind"]): r for r in pipeline_table(["sgdm"], [1, 4], steps=1500)}
    for row in rows.values():
        assert row["x_max"] == pytest.approx(row["sgdm_analytic"], rel=0.03)
    assert rows[1, "pipeline"]["x_max"] == pytest.approx(analytic_x_max(0, 0.9), rel=0.01)
    # the exact limits differ (the stalest stage lacks the very largest eigenvalue)
    assert rows[4, "pipeline"]["sgdm_analytic"] > rows[4, "constant"]["sgdm_analytic"]


def test_stability_cli_rejects_negative_delays(capsys):
    from abexp.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["stability", "--delays", "-1"])
    assert exit_.value.code == 2 and "argument --delays: must be >= 0, got -1" in capsys.readouterr().err
