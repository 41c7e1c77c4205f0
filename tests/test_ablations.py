"""Issue 39's ablations as config values, against hand-computed updates: LWP's momentum-aware
look-ahead, DC-ASGD's adaptive lambda, and the braking AB applies, logged per epoch."""

import json
import math

import pytest
import torch

from abexp.config import DelayCfg, OptimCfg, load_config, run_id
from abexp.sim.engine import DelayedSGD


@pytest.mark.parametrize("lookahead", ["linear", "momentum"])
def test_lwp_lookahead_hand_computed(lookahead):
    """Forward weights of step s are w_s − lr·H·v_s: H = D (linear) or (m − m^(D+1))/(1 − m)."""
    m, lr, d = 0.5, 0.1, 2
    cfg = OptimCfg(name="lwp", lr=lr, momentum=m, weight_decay=0.0, lwp_lookahead=lookahead)
    engine = DelayedSGD(torch.tensor([0.0]), [1], cfg, DelayCfg(steps=d), seed=0)
    h = d if lookahead == "linear" else m + m * m  # Σ_{k=1..2} 0.5^k = 0.75
    seen, expected, w, v = [], [], 0.0, 0.0
    for _ in range(5):
        expected.append(w - lr * h * v)  # the prediction made at step t, used at step t + 2
        engine.step(lambda w_fwd: (seen.append(float(w_fwd)), torch.tensor([1.0]))[1], lr)
        v = m * v + 1.0
        w -= lr * v
    assert seen == pytest.approx([expected[0], expected[0], expected[0], expected[1], expected[2]])


def test_the_momentum_look_ahead_at_d32_is_msnag_s():
    cfg = OptimCfg(name="lwp", momentum=0.9, lwp_lookahead="momentum")
    engine = DelayedSGD(torch.zeros(3), [3], cfg, DelayCfg(steps=32), seed=0)
    assert engine.optimizer.lookahead == [pytest.approx((0.9 - 0.9 ** 33) / 0.1)]
    assert engine.optimizer.lookahead[0] == pytest.approx(8.69, abs=0.01)  # issue 39: not 32


def test_dcasgd_adaptive_lambda_hand_computed():
    """λ_t = λ0/√(MS_t + 1e-7), MS_t = 0.95 MS_{t−1} + 0.05 g_t² (every step, from g_0 on)."""
    lam, lr = 0.5, 0.1
    cfg = OptimCfg(name="dcasgd", lr=lr, momentum=0.0, weight_decay=0.0, dc_lambda=lam, dc_adaptive=True)
    engine = DelayedSGD(torch.tensor([1.0, 1.0]), [2], cfg, DelayCfg(steps=1), seed=0)
    g0, g1 = [2.0, -1.0], [1.0, 3.0]
    engine.step(lambda w: torch.tensor(g0), lr)  # the pipeline fills: w_fwd = w, no correction
    w = [1.0 - lr * g for g in g0]
    assert engine.w.tolist() == pytest.approx(w)
    ms = [0.05 * g * g for g in g0]
    engine.step(lambda w_fwd: torch.tensor(g1), lr)  # w − w_fwd = w_1 − w_0
    gap = [a - 1.0 for a in w]
    ms = [0.95 * s + 0.05 * g * g for s, g in zip(ms, g1)]
    corrected = [g + lam / math.sqrt(s + 1e-7) * g * g * d for g, s, d in zip(g1, ms, gap)]
    assert engine.w.tolist() == pytest.approx([a - lr * c for a, c in zip(w, corrected)], rel=1e-6)
    # the plain rule on the same steps: λ0 itself
    plain = DelayedSGD(torch.tensor([1.0, 1.0]), [2], cfg.model_copy(update={"dc_adaptive": False}),
                       DelayCfg(steps=1), seed=0)
    plain.step(lambda w: torch.tensor(g0), lr)
    plain.step(lambda w: torch.tensor(g1), lr)
    assert plain.w.tolist() == pytest.approx([a - lr * (g + lam * g * g * d) for a, g, d in zip(w, g1, gap)])


def test_the_new_keys_at_their_defaults_keep_every_run_id():
    base = load_config(None, ["optim.name=lwp"])
    assert run_id(load_config(None, ["optim.name=lwp", "optim.lwp_lookahead=linear", "optim.dc_adaptive=false"])) \
        == run_id(base)
    assert run_id(load_config(None, ["optim.name=lwp", "optim.lwp_lookahead=momentum"])) != run_id(base)


def test_the_brake_log_is_the_mean_and_sd_of_1_minus_rho_cos():
    """Two tensors (sizes 2 and 3), rho 2, two steps: step 0 has v = 0 (cos 0, factor 1)."""
    cfg = OptimCfg(name="ab", lr=0.1, momentum=0.5, rho=2.0, weight_decay=0.0)
    engine = DelayedSGD(torch.zeros(5), [2, 3], cfg, DelayCfg(steps=0), seed=0)
    g0, g1 = [1.0, 0.0, 1.0, 1.0, 0.0], [1.0, 1.0, -1.0, 0.0, 0.0]
    engine.step(lambda w: torch.tensor(g0), 0.1)
    v = g0  # unbraked (factor 1) into zero velocity
    cos = lambda a, b: sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))  # noqa: E731
    factors = [1.0, 1.0, 1 - 2 * cos(g1[:2], v[:2]), 1 - 2 * cos(g1[2:], v[2:])]
    engine.step(lambda w: torch.tensor(g1), 0.1)
    mean = sum(factors) / 4
    sd = math.sqrt(sum((f - mean) ** 2 for f in factors) / 4)
    got = engine.optimizer.brake_log.read()
    assert got["brake_mean"] == pytest.approx(mean) and got["brake_sd"] == pytest.approx(sd)
    assert engine.optimizer.brake_log.read() == {}  # read starts the next epoch afresh


def test_an_ab_run_logs_its_braking_per_epoch_and_sgdm_does_not(tmp_path, tiny_overrides):
    from abexp.train.start import train_run
    for name in ("ab", "sgdm"):
        cfg = load_config(None, tiny_overrides + ["train.epochs=2", f"optim.name={name}", "delay.steps=2",
                                                  "optim.rho=2.0"])
        train_run(cfg, tmp_path / name, device="cpu", log=lambda s: None)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        if name == "ab":
            for r in rows:
                assert -1.0 <= r["brake_mean"] <= 3.0 and r["brake_sd"] >= 0.0  # 1 − 2 cos ∈ [−1, 3]
            assert rows[0]["brake_mean"] != rows[1]["brake_mean"]  # per epoch, not cumulative
        else:
            assert all("brake_mean" not in r for r in rows)
