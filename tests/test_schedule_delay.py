import math

import pytest

from abexp.config import ScheduleCfg
from abexp.sim.delay import DelaySampler, WeightHistory
from abexp.sim.schedule import lr_at


def test_multistep_milestones_are_fractions_of_training():
    cfg = ScheduleCfg(name="multistep", milestones=[0.5, 0.75], gamma=0.1)
    lrs = [lr_at(s, 0.1, 100, 10, cfg) for s in range(100)]
    assert lrs[49] == 0.1 and lrs[50] == pytest.approx(0.01) and lrs[75] == pytest.approx(0.001)


def test_warmup_then_cosine():
    cfg = ScheduleCfg(name="cosine", warmup_epochs=1)
    assert lr_at(0, 1.0, 100, 10, cfg) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 100, 10, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_constant_delay_and_history_fill_with_w0():
    hist = WeightHistory(3, 1, "cpu")
    for t in range(6):
        hist.slot(t).fill_(t)
        assert float(hist.stale(t, 3)) == max(t - 3, 0)


@pytest.mark.parametrize("kind,mean", [("uniform", None), ("geometric", 4.0)])
def test_stochastic_delays_are_seeded_bounded_and_have_the_right_mean(kind, mean):
    sampler = DelaySampler(kind, 16, mean, seed=3)
    taus = [sampler(t) for t in range(20000)]
    assert min(taus) >= 0 and max(taus) <= 16
    assert sum(taus) / len(taus) == pytest.approx(sampler.expected(), rel=0.03)
    again = DelaySampler(kind, 16, mean, seed=3)
    assert [again(t) for t in (19999, 5, 4096)] == [taus[19999], taus[5], taus[4096]]  # random access
    assert [DelaySampler(kind, 16, mean, seed=4)(t) for t in range(100)] != taus[:100]


def test_geometric_expected_value_is_the_capped_mean():
    p = 1 / 5
    exact = sum(min(k, 6) * p * (1 - p) ** k for k in range(2000))
    assert DelaySampler("geometric", 6, 4.0).expected() == pytest.approx(exact, rel=1e-9)


def test_epoch_factors_multiply_each_epochs_lr_of_the_named_schedule():
    plain = ScheduleCfg(name="cosine", warmup_epochs=0.5)
    scaled = ScheduleCfg(name="cosine", warmup_epochs=0.5, epoch_factors=[0.4, 0.6, 0.9])
    for step in (0, 4, 9, 10, 17, 19, 20, 29):  # 3 epochs of 10 steps, warmup 5 steps
        factor = (0.4, 0.6, 0.9)[step // 10]
        assert lr_at(step, 0.025, 30, 10, scaled) == lr_at(step, 0.025, 30, 10, plain) * factor
    # by hand: step 17 is past warmup, cosine over the 25 steps after it, epoch 1's factor 0.6
    assert lr_at(17, 1.0, 30, 10, scaled) == pytest.approx(0.6 * 0.5 * (1 + math.cos(math.pi * 12 / 25)))
    assert lr_at(3, 1.0, 30, 10, scaled) == pytest.approx(0.4 * 4 / 5)  # warmup, epoch 0


@pytest.mark.parametrize("factors", [[], [0.5, 0.0], [1.0, float("nan")], [-1.0]])
def test_epoch_factors_must_be_positive(factors):
    with pytest.raises(ValueError):
        ScheduleCfg(epoch_factors=factors)
