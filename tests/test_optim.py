"""Update rules against independent references: torch.optim.SGD, naive delayed SGD, hand math."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from abexp.config import DelayCfg, OptimCfg
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.train.models import build_model
from abexp.sim.optim import segment_cosine
from conftest import drive


def batches(n_steps, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n_steps)]


def run_engine(optim: OptimCfg, delay: int, data, lr, seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet8")
    flat = FlatParams(model)
    engine = DelayedSGD(flat.data, flat.sizes, optim, DelayCfg(steps=delay), seed=0)
    return drive(engine, model, flat, data, lr)


def reference_delayed_sgd(delay, data, lr, momentum, wd, nesterov, seed=0):
    """Naive delayed SGD: explicit copies of old weights, gradient recomputed on a second model,
    applied to the current weights by torch.optim.SGD (which adds wd * current weights)."""
    torch.manual_seed(seed)
    model = build_model("resnet8")
    stale_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd,
                          nesterov=nesterov)
    old = [copy.deepcopy([p.detach().clone() for p in model.parameters()])]
    for t, (x, y) in enumerate(data):
        stale = old[max(t - delay, 0)]
        with torch.no_grad():
            for p, s in zip(stale_model.parameters(), stale):
                p.copy_(s)
        stale_model.zero_grad()
        F.cross_entropy(stale_model(x), y).backward()
        for p, s in zip(model.parameters(), stale_model.parameters()):
            p.grad = s.grad.clone()
        opt.step()
        old.append([p.detach().clone() for p in model.parameters()])
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("nesterov", [False, True])
def test_delay0_sgdm_reproduces_torch_sgd(nesterov):
    data = batches(20)
    cfg = OptimCfg(name="sgdm", lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    ours = run_engine(cfg, 0, data, lr=0.05)
    ref = reference_delayed_sgd(0, data, 0.05, 0.9, 5e-4, nesterov)
    assert rel_err(ours, ref) < 1e-6


@pytest.mark.parametrize("delay", [1, 3])
def test_constant_delay_matches_naive_reference(delay):
    data = batches(12)
    cfg = OptimCfg(name="sgdm", lr=0.05, momentum=0.9, weight_decay=5e-4)
    ours = run_engine(cfg, delay, data, lr=0.05)
    ref = reference_delayed_sgd(delay, data, 0.05, 0.9, 5e-4, False)
    assert rel_err(ours, ref) < 1e-6
    undelayed = reference_delayed_sgd(0, data, 0.05, 0.9, 5e-4, False)
    assert rel_err(ours, undelayed) > 1e-3  # the delay really changed the trajectory


def test_ab_with_rho0_equals_sgdm():
    data = batches(8)
    sgdm = run_engine(OptimCfg(name="sgdm", lr=0.05), 2, data, lr=0.05)
    ab0 = run_engine(OptimCfg(name="ab", lr=0.05, rho=0.0), 2, data, lr=0.05)
    assert torch.equal(sgdm, ab0)
    ab1 = run_engine(OptimCfg(name="ab", lr=0.05, rho=1.0), 2, data, lr=0.05)
    assert not torch.equal(sgdm, ab1)


def one_step(name, w, v, g, lr=0.1, m=0.5, rho=1.0, cosine="tensor", sizes=(2, 3)):
    cfg = OptimCfg(name=name, lr=lr, momentum=m, rho=rho, weight_decay=0.0, ab_cosine=cosine)
    engine = DelayedSGD(torch.tensor(w), list(sizes), cfg, DelayCfg(steps=0), seed=0)
    engine.optimizer.v.copy_(torch.tensor(v))
    engine.step(lambda w_fwd: torch.tensor(g), lr)
    return engine.w.tolist(), engine.optimizer.v.tolist()


def test_ab_hand_computed_per_tensor_and_global():
    w, v, g = [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 2.0]
    # per tensor: segment 1 cos = 1/sqrt(2); segment 2 cos = 0
    s1 = 1 - 1 / math.sqrt(2)
    g_t = [s1 * 1, s1 * 1, 0.0, 0.0, 2.0]
    v_new = [0.5 * a + b for a, b in zip(v, g_t)]
    w_new = [a - 0.1 * b for a, b in zip(w, v_new)]
    got_w, got_v = one_step("ab", w, v, g)
    assert got_v == pytest.approx(v_new, rel=1e-6) and got_w == pytest.approx(w_new, rel=1e-6)
    # global: cos = <g,v>/(|g||v|) = 1 / (sqrt(6) sqrt(2))
    s = 1 - 1 / math.sqrt(12)
    v_new = [0.5 * a + s * b for a, b in zip(v, g)]
    w_new = [a - 0.1 * b for a, b in zip(w, v_new)]
    got_w, got_v = one_step("ab", w, v, g, cosine="global")
    assert got_v == pytest.approx(v_new, rel=1e-6) and got_w == pytest.approx(w_new, rel=1e-6)


def test_ab_amplifies_a_gradient_opposing_the_velocity():
    got_w, got_v = one_step("ab", [0.0], [1.0], [-1.0], m=0.0, sizes=(1,))
    assert got_v == pytest.approx([-2.0])  # cos = -1: (1 - rho * -1) * g


def test_ab_cosine_is_zero_when_velocity_is_zero():
    got_w, got_v = one_step("ab", [0.0, 0.0], [0.0, 0.0], [1.0, 2.0], sizes=(2,))
    assert got_v == pytest.approx([1.0, 2.0])


def test_dcasgd_hand_computed():
    cfg = OptimCfg(name="dcasgd", lr=0.1, momentum=0.0, weight_decay=0.0, dc_lambda=0.5)
    engine = DelayedSGD(torch.tensor([1.0, 1.0]), [2], cfg, DelayCfg(steps=1), seed=0)
    engine.step(lambda w: torch.tensor([2.0, -1.0]), 0.1)  # step 0: fills, tau=1 -> w_0, no correction term
    assert engine.w.tolist() == pytest.approx([0.8, 1.1])
    engine.step(lambda w: torch.tensor([1.0, 1.0]), 0.1)  # w - w_fwd = [-0.2, 0.1]
    g = [1 + 0.5 * 1 * (-0.2), 1 + 0.5 * 1 * 0.1]
    assert engine.w.tolist() == pytest.approx([0.8 - 0.1 * g[0], 1.1 - 0.1 * g[1]])


def test_staleness_aware_lr_divides_by_the_actual_staleness():
    """tau = 4, but while the pipeline fills (t < 4) the gradient at w_0 is only t steps old."""
    cfg = OptimCfg(name="salr", lr=0.1, momentum=0.0, weight_decay=0.0)
    engine = DelayedSGD(torch.tensor([0.0], dtype=torch.float64), [1], cfg, DelayCfg(steps=4), seed=0)
    w = 0.0
    for t in range(7):
        engine.step(lambda w: torch.tensor([1.0], dtype=torch.float64), 0.1)
        w -= 0.1 / max(1, min(t, 4))
        assert float(engine.w) == pytest.approx(w, rel=1e-12)


def test_spike_compensation_uses_the_actual_staleness_while_filling():
    """At step t < D the gradient is t steps old: SC's a, b use m^t, not m^D."""
    m, lr = 0.9, 0.1
    cfg = OptimCfg(name="sc", lr=lr, momentum=m, weight_decay=0.0)
    engine = DelayedSGD(torch.tensor([0.0], dtype=torch.float64), [1], cfg, DelayCfg(steps=8), seed=0)
    w, v = 0.0, 0.0
    for t in range(4):
        g = float(t + 1)
        engine.step(lambda _: torch.tensor([g], dtype=torch.float64), lr)
        v = m * v + g
        a, b = (m ** t, (1 - m ** t) / (1 - m)) if t > 0 else (1.0, 0.0)
        w -= lr * (a * v + b * g)
        assert float(engine.w) == pytest.approx(w, rel=1e-12)


def test_weight_decay_enters_before_adaptive_braking():
    """AB scales the full gradient, weight decay included: cos and the scale both see g + wd w."""
    cfg = OptimCfg(name="ab", lr=0.1, momentum=0.5, weight_decay=0.5, rho=1.0, ab_cosine="global")
    engine = DelayedSGD(torch.tensor([1.0, 2.0], dtype=torch.float64), [2], cfg, DelayCfg(), seed=0)
    engine.optimizer.v.copy_(torch.tensor([1.0, 0.0]))
    engine.step(lambda _: torch.tensor([0.0, 1.0], dtype=torch.float64), 0.1)
    g = torch.tensor([0.0, 1.0], dtype=torch.float64) + 0.5 * torch.tensor([1.0, 2.0], dtype=torch.float64)
    cos = float(g @ torch.tensor([1.0, 0.0], dtype=torch.float64) / g.norm())  # v = [1, 0]
    v = 0.5 * torch.tensor([1.0, 0.0], dtype=torch.float64) + (1 - cos) * g
    assert engine.w.tolist() == pytest.approx((torch.tensor([1.0, 2.0], dtype=torch.float64) - 0.1 * v).tolist(), rel=1e-12)


def test_dcasgd_compensates_the_loss_gradient_only():
    """Zheng et al.: g + lambda g*g*(w - w_fwd) with g the loss gradient; weight decay added apart."""
    cfg = OptimCfg(name="dcasgd", lr=0.1, momentum=0.0, weight_decay=0.3, dc_lambda=0.5)
    engine = DelayedSGD(torch.tensor([1.0], dtype=torch.float64), [1], cfg, DelayCfg(steps=1), seed=0)
    engine.step(lambda w: torch.tensor([0.0], dtype=torch.float64), 0.1)  # w1 = 1 - 0.1*0.3
    w1 = 1.0 - 0.03
    engine.step(lambda w: torch.tensor([2.0], dtype=torch.float64), 0.1)  # w_fwd = w0 = 1
    g = 2.0 + 0.5 * 2.0 * 2.0 * (w1 - 1.0) + 0.3 * w1
    assert float(engine.w) == pytest.approx(w1 - 0.1 * g, rel=1e-12)


def test_ab_cosine_survives_tiny_and_huge_norms():
    """|g|^2 |v|^2 under- or overflows float32 where |g| |v| does not: AB must stay on."""
    for scale in (1e-12, 1e12):  # |g|^2 |v|^2 = 1e-48 (below float32's smallest) or 1e48 (above its largest)
        g = torch.tensor([1.0, 1.0]) * scale
        v = torch.tensor([1.0, 0.0]) * scale
        cos = segment_cosine(g, v, None)
        assert float(cos) == pytest.approx(2 ** -0.5, rel=1e-5)


def test_lwp_stores_predicted_weights():
    """Forward weights of step s are w_s - eta * D * v_s; with constant gradient 1 and m=0.5."""
    cfg = OptimCfg(name="lwp", lr=0.1, momentum=0.5, weight_decay=0.0)
    engine = DelayedSGD(torch.tensor([0.0]), [1], cfg, DelayCfg(steps=2), seed=0)
    seen, w, v = [], 0.0, 0.0
    expected = []
    for t in range(5):
        expected.append(w - 0.1 * 2 * v)  # prediction made at step t; used at step t + 2
        engine.step(lambda w_fwd: (seen.append(float(w_fwd)), torch.tensor([1.0]))[1], 0.1)
        v = 0.5 * v + 1.0
        w = w - 0.1 * v
    assert seen == pytest.approx([expected[0], expected[0], expected[0], expected[1], expected[2]])


def impulse_trace(name, delay, arrival, steps=12, m=0.9, lr=0.1):
    """Per-step weight changes when the only non-zero gradient is applied at step ``arrival``."""
    cfg = OptimCfg(name=name, lr=lr, momentum=m, weight_decay=0.0)
    engine = DelayedSGD(torch.zeros(1, dtype=torch.float64), [1], cfg, DelayCfg(steps=delay), seed=0)
    deltas = []
    for t in range(steps):
        before = float(engine.w)
        engine.step(lambda w: torch.tensor([1.0 if t == arrival else 0.0], dtype=torch.float64), lr)
        deltas.append(float(engine.w) - before)
    return deltas


def test_spike_compensation_matches_undelayed_sgdm_from_arrival_on():
    D, s = 4, 2  # gradient of the batch of step s arrives at step s + D
    undelayed = impulse_trace("sgdm", 0, s)
    sc = impulse_trace("sc", D, s + D)
    plain = impulse_trace("sgdm", D, s + D)
    # arrival step: everything undelayed SGDM would have applied up to and including it
    assert sc[s + D] == pytest.approx(sum(undelayed[s:s + D + 1]), rel=1e-12)
    # every later step: exactly undelayed SGDM's contribution
    assert sc[s + D + 1:] == pytest.approx(undelayed[s + D + 1:], rel=1e-12)
    assert sum(sc) == pytest.approx(sum(undelayed), rel=1e-12)
    assert plain[s + D + 1] != pytest.approx(undelayed[s + D + 1])  # without SC they differ


@pytest.mark.parametrize("where", ["current", "stale"])
def test_weight_decay_on_current_or_stale_weights(where):
    cfg = OptimCfg(name="sgdm", lr=0.1, momentum=0.0, weight_decay=0.5, weight_decay_on=where)
    engine = DelayedSGD(torch.tensor([1.0]), [1], cfg, DelayCfg(steps=1), seed=0)
    zero = lambda w: torch.zeros(1)
    engine.step(zero, 0.1)  # w1 = w0 - 0.1 * 0.5 * w0 (current and stale are both w0)
    engine.step(zero, 0.1)  # the forward weights of step 1 are w0 (delay 1)
    w1 = 1.0 - 0.05
    expect = w1 - 0.05 * (w1 if where == "current" else 1.0)
    assert float(engine.w) == pytest.approx(expect)


def _linear_grad(w):  # a gradient that depends on the weights it is computed at
    return 0.5 * w + torch.tensor([1.0, -2.0], dtype=torch.float64)


def test_gap_aware_hand_computed_against_ftpipes_rule():
    """Gap-Aware as FTPipe's sgd_gap_aware.py: C = lr_max (sqrt(EMA_0.999(v^2) / (1 - 0.999^k))
    + 1e-8) from v before the step; (g + wd w) / (1 + |w - w_fwd| / C); then momentum SGD.
    A naive recomputation with an explicit weight history, lrs that rise and fall (lr_max)."""
    m, wd, beta, eps, delay = 0.9, 0.1, 0.999, 1e-8, 2
    cfg = OptimCfg(name="gap_aware", lr=0.1, momentum=m, weight_decay=wd)
    engine = DelayedSGD(torch.tensor([1.0, -1.0], dtype=torch.float64), [2], cfg, DelayCfg(steps=delay), seed=0)
    history, v, avg, lr_max = [torch.tensor([1.0, -1.0], dtype=torch.float64)], torch.zeros(2, dtype=torch.float64), \
        torch.zeros(2, dtype=torch.float64), 0.0
    for t, lr in enumerate([0.05, 0.1, 0.2, 0.1, 0.05, 0.02]):
        engine.step(_linear_grad, lr)
        w, w_fwd = history[-1], history[max(0, t - delay)]
        lr_max = max(lr_max, lr)
        avg = beta * avg + (1 - beta) * v * v
        c = lr_max * (torch.sqrt(avg / (1 - beta ** (t + 1))) + eps)
        g = (_linear_grad(w_fwd) + wd * w) / (1 + (w - w_fwd).abs() / c)
        v = m * v + g
        history.append(w - lr * v)
        assert engine.w.tolist() == pytest.approx(history[-1].tolist(), rel=1e-12)
    assert (history[3] - history[1]).abs().max() > 0  # the gap was not zero: the penalty acted


def test_gap_aware_and_delay_adaptive_without_delay_are_sgdm_bitwise():
    data = batches(6)
    sgdm = run_engine(OptimCfg(name="sgdm"), 0, data, 0.05)
    for name in ("gap_aware", "delay_adaptive"):
        assert torch.equal(run_engine(OptimCfg(name=name), 0, data, 0.05), sgdm), name


def test_delay_adaptive_step_is_lr_m_over_max_m_tau():
    """Mishchenko et al. 2022: eta = lr M / max(M, tau), M = tau_c; tau the actual staleness
    (min(t, D) while the pipeline fills)."""
    cfg = OptimCfg(name="delay_adaptive", lr=0.1, momentum=0.0, weight_decay=0.0, tau_c=2.0)
    engine = DelayedSGD(torch.tensor([0.0], dtype=torch.float64), [1], cfg, DelayCfg(steps=6), seed=0)
    w = 0.0
    for t in range(9):
        engine.step(lambda w: torch.tensor([1.0], dtype=torch.float64), 0.1)
        w -= 0.1 * 2 / max(2, min(t, 6))
        assert float(engine.w) == pytest.approx(w, rel=1e-12)
    # tau_c unset: M is the expected delay, so a constant delay is not rescaled at all
    plain = DelayedSGD(torch.tensor([0.0], dtype=torch.float64), [1], OptimCfg(
        name="delay_adaptive", momentum=0.0, weight_decay=0.0), DelayCfg(steps=6), seed=0)
    for t in range(9):
        plain.step(lambda w: torch.tensor([1.0], dtype=torch.float64), 0.1)
    assert float(plain.w) == pytest.approx(-0.9, rel=1e-12)


def test_pipemare_lr_is_lr_over_tau_to_an_annealed_power():
    """PipeMare's rescheduling (our reconstruction, docs/implementation.md): eta_k = lr *
    max(1, tau)^-p_k, p_k = max(0, 1 - k / K); tau the actual staleness, min(k, D) while the
    pipeline fills. Momentum 0 and a constant gradient: w moves by eta_k each step."""
    cfg = OptimCfg(name="pipemare_lr", lr=0.1, momentum=0.0, weight_decay=0.0, pipemare_anneal_steps=5)
    engine = DelayedSGD(torch.tensor([0.0], dtype=torch.float64), [1], cfg, DelayCfg(steps=4), seed=0)
    w = 0.0
    for k in range(9):
        engine.step(lambda w: torch.tensor([1.0], dtype=torch.float64), 0.1)
        w -= 0.1 * max(1, min(k, 4)) ** -max(0.0, 1 - k / 5)
        assert float(engine.w) == pytest.approx(w, rel=1e-12)
    assert w != pytest.approx(-0.9)  # it did rescale (a plain SGD walk would be at -0.9)


def test_adl_applies_the_mean_of_every_m_gradients_at_once():
    """ADL's accumulation: M delayed gradients summed, their mean one momentum-SGD update
    (weight decay on the weights at update time); no change in between. A naive recomputation
    with an explicit weight history."""
    m, wd, delay, steps = 0.9, 0.1, 3, 3
    cfg = OptimCfg(name="adl", lr=0.1, momentum=m, weight_decay=wd, adl_steps=steps)
    engine = DelayedSGD(torch.tensor([1.0, -1.0], dtype=torch.float64), [2], cfg, DelayCfg(steps=delay), seed=0)
    history, v, acc = [torch.tensor([1.0, -1.0], dtype=torch.float64)], torch.zeros(2, dtype=torch.float64), []
    for t, lr in enumerate([0.05, 0.1, 0.2, 0.1, 0.05, 0.02, 0.05, 0.1, 0.1]):
        engine.step(_linear_grad, lr)
        w = history[-1]
        acc.append(_linear_grad(history[max(0, t - delay)]))
        if len(acc) == steps:
            v = m * v + (sum(acc) / steps + wd * w)
            w = w - lr * v
            acc = []
        history.append(w)
        assert engine.w.tolist() == pytest.approx(history[-1].tolist(), rel=1e-12)
    assert torch.equal(history[1], history[0]) and not torch.equal(history[3], history[2])


def test_new_rules_reduce_to_sgdm_where_they_should():
    """No delay: PipeMare's rate is lr (tau <= 1); ADL with one gradient per update, and AB + ADL
    with rho = 0, are SGDM; PipeMare with K = 0 (no annealing phase) is SGDM at any delay. Bitwise."""
    data = batches(6)
    sgdm = run_engine(OptimCfg(name="sgdm"), 0, data, 0.05)
    for cfg in (OptimCfg(name="pipemare_lr"), OptimCfg(name="adl", adl_steps=1),
                OptimCfg(name="ab_adl", adl_steps=1, rho=0.0)):
        assert torch.equal(run_engine(cfg, 0, data, 0.05), sgdm), cfg.name
    delayed = run_engine(OptimCfg(name="sgdm"), 3, data, 0.05)
    assert torch.equal(run_engine(OptimCfg(name="pipemare_lr", pipemare_anneal_steps=0), 3, data, 0.05), delayed)
    assert torch.equal(run_engine(OptimCfg(name="ab_adl", adl_steps=1), 3, data, 0.05),
                       run_engine(OptimCfg(name="ab"), 3, data, 0.05))


@pytest.mark.parametrize("name", ["gap_aware", "pipemare_lr", "adl"])
def test_stateful_rules_resume_bitwise_from_their_state(name):
    """Gap-Aware's EMA, PipeMare's step count and ADL's accumulated gradients are state: a resume
    after 5 steps (mid-annealing; mid-accumulation with M = 3) continues exactly."""
    cfg = OptimCfg(name=name, lr=0.1, momentum=0.9, weight_decay=0.01, adl_steps=3, pipemare_anneal_steps=8)
    make = lambda: DelayedSGD(torch.tensor([1.0, -1.0], dtype=torch.float64), [2], cfg,  # noqa: E731
                              DelayCfg(steps=3), seed=0)
    whole, first = make(), make()
    for _ in range(5):
        whole.step(_linear_grad, 0.1)
        first.step(_linear_grad, 0.1)
    state = copy.deepcopy(first.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    for _ in range(6):
        whole.step(_linear_grad, 0.1)
        resumed.step(_linear_grad, 0.1)
    assert torch.equal(whole.w, resumed.w)


def test_drop_stale_discards_exactly_the_updates_staler_than_its_threshold():
    """Koloskova et al.'s delay threshold as abexp reconstructs it (docs/implementation.md): an
    update whose gradient is staler than tau_D is skipped, weights and velocity unchanged;
    otherwise momentum SGD. A naive loop over an explicit weight history and a trace of delays."""
    import tempfile
    from pathlib import Path
    delays = [0, 3, 1, 5, 2, 0, 4, 1, 3, 6]
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.txt"
        trace.write_text("".join(f"{d}\n" for d in delays))
        delay = DelayCfg(kind="trace", trace=str(trace))
        cfg = OptimCfg(name="drop_stale", lr=0.1, momentum=0.9, weight_decay=0.01, drop_above=2.0)
        engine = DelayedSGD(torch.tensor([1.0, -1.0], dtype=torch.float64), [2], cfg, delay, seed=0)
        history, v, skipped = [torch.tensor([1.0, -1.0], dtype=torch.float64)], torch.zeros(2, dtype=torch.float64), 0
        for t, d in enumerate(delays):
            engine.step(_linear_grad, 0.1)
            w = history[-1]
            tau = min(d, t)
            if tau > 2:
                history.append(w.clone())
                skipped += 1
            else:
                v = 0.9 * v + _linear_grad(history[t - tau]) + 0.01 * w
                history.append(w - 0.1 * v)
            assert engine.w.tolist() == pytest.approx(history[-1].tolist(), rel=1e-12)
            assert engine.optimizer.v.tolist() == pytest.approx(v.tolist(), rel=1e-12)
    assert skipped == 4
    # the default threshold is twice the expected delay: a constant delay is never dropped
    data = batches(6)
    assert torch.equal(run_engine(OptimCfg(name="drop_stale"), 3, data, 0.05),
                       run_engine(OptimCfg(name="sgdm"), 3, data, 0.05))
    assert torch.equal(run_engine(OptimCfg(name="drop_stale"), 0, data, 0.05),
                       run_engine(OptimCfg(name="sgdm"), 0, data, 0.05))


def test_every_delay_mitigation_is_sgdm_or_ab_without_delay():
    """Without delay there is nothing to mitigate: SC, LWP, DC-ASGD, salr, Gap-Aware, PipeMare's
    rescheduling, delay_adaptive and drop_stale are SGDM bitwise, and AB + LWP is AB (what
    experiments/fashion_mnist_mitigations.yaml relies on to skip their D = 0 runs)."""
    data = batches(6)
    sgdm = run_engine(OptimCfg(name="sgdm"), 0, data, 0.05)
    for name in ("sc", "lwp", "sc_lwp", "dcasgd", "salr", "gap_aware", "pipemare_lr", "delay_adaptive", "drop_stale"):
        assert torch.equal(run_engine(OptimCfg(name=name), 0, data, 0.05), sgdm), name
    assert torch.equal(run_engine(OptimCfg(name="ab_lwp"), 0, data, 0.05), run_engine(OptimCfg(name="ab"), 0, data, 0.05))
