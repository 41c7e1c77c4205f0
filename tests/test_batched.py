"""The vectorised update of packed runs (abexp.sim.batched) against torch.optim.SGD and against
each run's own DelayedSGD engine: bitwise, with mixed rules, delays and step sizes; and its
operation count against the number of runs."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from abexp.config import DelayCfg, OptimCfg
from abexp.sim import batched
from abexp.sim.batched import BatchedSGD, covers, group_key
from abexp.sim.engine import DelayedSGD

SIZES = [7, 300, 1, 600, 45]  # tensors shorter than, straddling and longer than a 256 block
P = sum(SIZES)


def quadratic(seed: int):
    """A run's loss 0.5 a·w² - b·w: its gradient at w, a pure function (no autograd)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.rand(P, generator=gen) + 0.5, torch.randn(P, generator=gen)
    return lambda w: a * w - b


def make(runs, seed0=0):
    """Per run: its engine, its optimizer settings and its gradient function."""
    out = []
    for j, (optim, delay) in enumerate(runs):
        w0 = torch.randn(P, generator=torch.Generator().manual_seed(100 + seed0 + j))
        cfg_o, cfg_d = OptimCfg(**optim), DelayCfg(**delay)
        out.append((DelayedSGD(w0, SIZES, cfg_o, cfg_d, seed=j), cfg_o, quadratic(seed0 + j)))
    return out


def together(runs, lr_fn):
    """A BatchedSGD over ``runs`` (grouped as PackedRun groups them) and the row order."""
    order = sorted(range(len(runs)), key=lambda j: group_key(runs[j][1]))
    fwd, grad = torch.empty(len(runs), P), torch.empty(len(runs), P)
    engine = BatchedSGD([runs[j][0] for j in order], [runs[j][1] for j in order], SIZES,
                        lambda t: [lr_fn(t)[j] for j in order], fwd, grad)
    return engine, order, fwd, grad


def step_together(engine, order, fwd, grad, runs, lrs):
    engine.begin([lrs[j] for j in order])
    for row, j in enumerate(order):
        grad[row] = runs[j][2](fwd[row])
    engine.finish()


def flat_state(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from flat_state(value, prefix + key + ".")
        else:
            yield prefix + key, value


def assert_same_state(a: DelayedSGD, b: DelayedSGD):
    sa, sb = dict(flat_state(a.state_dict())), dict(flat_state(b.state_dict()))
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key  # bitwise
        else:
            assert sa[key] == sb[key], key


def test_rows_at_delay_zero_equal_torch_optim_sgd():
    """Different lr, momentum, weight decay and Nesterov per row: each row takes exactly
    torch.optim.SGD's steps (the independent reference), bitwise."""
    settings = [dict(lr=0.1, momentum=0.9, weight_decay=1e-4), dict(lr=0.03, momentum=0.5, weight_decay=0.0),
                dict(lr=0.2, momentum=0.8, nesterov=True, weight_decay=5e-4), dict(lr=0.05, momentum=0.0, weight_decay=0.0),
                dict(lr=0.01, momentum=0.99, weight_decay=1e-3)]
    runs = make([(dict(name="sgdm", **s), {}) for s in settings])
    refs = [e.w.clone() for e, _, _ in runs]
    opts = [torch.optim.SGD([w], lr=s["lr"], momentum=s.get("momentum", 0.0), nesterov=s.get("nesterov", False),
                            weight_decay=s.get("weight_decay", 0.0), foreach=False)
            for w, s in zip(refs, settings)]
    lrs = [s["lr"] for s in settings]
    engine, order, fwd, grad = together(runs, lambda t: lrs)
    for _ in range(6):
        step_together(engine, order, fwd, grad, runs, lrs)
        for w, opt, (_, _, grad_fn) in zip(refs, opts, runs):
            w.grad = grad_fn(w.detach())
            opt.step()
    for w, (e, _, _) in zip(refs, runs):
        assert torch.equal(e.w, w)
        assert not torch.equal(e.w, e.history.buffer[0])  # it moved


MIXED = [  # rules, delays and settings that differ per run, several rows per group
    (dict(name="sgdm", lr=0.1), dict(kind="constant", steps=0)),
    (dict(name="ab", lr=0.05, rho=0.5), dict(kind="constant", steps=3)),
    (dict(name="sgdm", lr=0.02, nesterov=True, momentum=0.8), dict(kind="uniform", steps=4)),
    (dict(name="ab", lr=0.1, weight_decay_on="stale", momentum=0.7), dict(kind="geometric", steps=6, mean=2.0)),
    (dict(name="sgdm", lr=0.03, weight_decay=0.0), dict(kind="constant", steps=1)),
    (dict(name="ab", lr=0.07, rho=2.0), dict(kind="uniform", steps=2)),
    (dict(name="ab", lr=0.04, rho=0.0), dict(kind="constant", steps=5)),  # no brake: an SGDM row
    (dict(name="sgdm", lr=0.06, weight_decay=1e-3), dict(kind="trace", histogram={0: 1.0, 3: 2.0})),
]


@pytest.mark.parametrize("chunk", [256, 5])  # 5: step tables rebuilt mid-run
def test_mixed_rows_equal_their_own_engines_bitwise(chunk, monkeypatch):
    monkeypatch.setattr(batched, "CHUNK", chunk)
    alone, rows = make(MIXED), make(MIXED)
    schedule = lambda t: [o["lr"] * (1.0 - 0.03 * t) for o, _ in MIXED]  # noqa: E731  per step, per run
    engine, order, fwd, grad = together(rows, schedule)
    assert len(engine.slices) == len({group_key(o) for _, o, _ in rows}) == 5
    for t in range(14):
        lrs = schedule(t) if t != 7 else [0.01] * len(MIXED)  # a step at rates the schedule does not give
        step_together(engine, order, fwd, grad, rows, lrs)
        for (e, _, grad_fn), lr in zip(alone, lrs):
            e.step(grad_fn, lr)
    for (a, _, _), (b, _, _) in zip(alone, rows):
        assert_same_state(a, b)
        assert b.t == 14
    braked = [e.optimizer.brake_log for e, o, _ in rows if o.name == "ab" and o.rho]
    assert all(log.count == 14 * len(SIZES) for log in braked)


def test_an_inactive_row_keeps_its_state_and_the_others_go_on():
    alone, rows = make(MIXED), make(MIXED)
    lrs = [o["lr"] for o, _ in MIXED]
    engine, order, fwd, grad = together(rows, lambda t: lrs)
    stopped = order[2]  # a row inside a group: the group is cut in two
    for t in range(8):
        if t == 3:
            engine.set_active([j != stopped for j in order])
        step_together(engine, order, fwd, grad, rows, lrs)
        for j, ((e, _, grad_fn), lr) in enumerate(zip(alone, lrs)):
            if j != stopped or t < 3:
                e.step(grad_fn, lr)
    for j, ((a, _, _), (b, _, _)) in enumerate(zip(alone, rows)):
        assert torch.equal(a.w, b.w) and torch.equal(a.optimizer.v, b.optimizer.v) and a.t == b.t
    assert rows[stopped][0].t == 3


def test_what_it_does_not_cover_is_refused():
    for optim, delay in [(dict(name="sc"), {}), (dict(name="adam"), {}), (dict(name="lwp"), {}),
                         (dict(name="ab", ab_cosine="global"), {}),
                         (dict(name="sgdm"), dict(kind="pipeline", stages=2))]:
        (e, o, _), = make([(optim, delay)])
        assert not covers(e, o)
        with pytest.raises(ValueError, match="covers"):
            BatchedSGD([e], [o], SIZES, lambda t: [0.1], torch.empty(1, P), torch.empty(1, P))
    (e, o, _), = make([(dict(name="ab", ab_cosine="global", rho=0.0), {})])  # global but no brake
    assert covers(e, o)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_operations_per_step_do_not_grow_with_the_runs():
    """The same groups with 2 rows each or 12 rows each: the same operations per step (the
    per-run engines' count grows twelvefold)."""
    def count(copies: int, vectorised: bool) -> Counter:
        runs = make([r for r in MIXED[:3] for _ in range(copies)])
        lrs = [o.lr for _, o, _ in runs]
        if not vectorised:
            step = lambda: [e.step(g, lr) for (e, _, g), lr in zip(runs, lrs)]  # noqa: E731
        else:
            engine, order, fwd, grad = together(runs, lambda t: lrs)
            for row, j in enumerate(order):
                grad[row] = runs[j][2](fwd[row])

            def step():
                engine.begin([lrs[j] for j in order])
                engine.finish()
        step()  # the first step builds the step tables
        with CountOps() as counter:
            step()
        return counter.ops

    assert count(2, True) == count(12, True)
    assert sum(count(12, False).values()) > 5 * sum(count(2, True).values())
