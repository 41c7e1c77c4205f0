"""Per-stage (pipeline) and trace delays, and the Adam family, against references written here:
a list of past weight snapshots with per-stage weights assembled tensor by tensor, brute-force
stage partitions, torch.optim.Adam/AdamW, and hand-computed steps."""

import copy
import itertools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from abexp.cli import main
from abexp.config import ConfigError, DelayCfg, OptimCfg, load_config
from abexp.sim.delay import DelaySampler
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.train.models import build_model
from abexp.sim.pipeline import balanced_cuts, profile_delays, stage_ranges, tensor_flops
from abexp.train.start import train_run
from conftest import drive


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(n)]


# ---------------------------------------------------------------- the stage cut

def brute_force_cuts(costs, stages):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        if best is None or worst < best[0]:
            best = (worst, list(cuts))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_balanced_cut_minimises_the_largest_stage(seed):
    gen = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 100, (9,), generator=gen).tolist()
    for stages in (1, 2, 3, 5, 9):
        cuts = balanced_cuts(costs, stages)
        bounds = [0, *cuts, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        assert len(cuts) == stages - 1 and all(a < b for a, b in zip(bounds[:-1], bounds[1:]))
        assert worst == brute_force_cuts(costs, stages)[0]


def test_profile_and_cap():
    assert profile_delays(4) == [6, 4, 2, 0]
    assert profile_delays(4, cap=3) == [3, 3, 2, 0]
    with pytest.raises(ValueError, match="non-empty stages"):
        balanced_cuts([1, 2], 3)


def test_flops_are_charged_to_each_layers_weight():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    costs = tensor_flops(model, (1, 6, 6))
    # conv: 4x6x6 outputs x (1x3x3) MACs; BN weight and bias: one per output; linear: 5 x 144, bias 5
    assert costs == [4 * 36 * 9, 4 * 36, 4 * 36, 5 * 144, 5]


# ---------------------------------------------------------------- pipeline: engine vs naive

def naive_pipeline(name, stage_of, delays, data, lr, m=0.9, wd=5e-4, dc=0.04):
    """Snapshots of every step's forward weights; tensor i of the forward pass of step t comes
    from snapshot max(t - D_s, 0), s its stage; each mitigation with that stage's staleness."""
    torch.manual_seed(0)
    model = build_model("resnet8")
    worker = copy.deepcopy(model)
    params = list(model.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    snapshots = []
    for t, (x, y) in enumerate(data):
        with torch.no_grad():  # what this step stores (LWP: predicted with its stage's horizon)
            snapshots.append([p - lr * delays[stage_of[i]] * v if name == "lwp" else p.clone()
                              for i, (p, v) in enumerate(zip(params, velocity))])
            fwd = [snapshots[max(t - delays[stage_of[i]], 0)][i] for i in range(len(params))]
            for q, f in zip(worker.parameters(), fwd):
                q.copy_(f)
        worker.zero_grad()
        F.cross_entropy(worker(x), y).backward()
        with torch.no_grad():
            for i, (p, q, v, f) in enumerate(zip(params, worker.parameters(), velocity, fwd)):
                tau = min(delays[stage_of[i]], t)  # actual staleness (the pipeline fills)
                g = q.grad.clone()
                if name == "dcasgd" and tau > 0:
                    g = g + dc * g * g * (p - f)
                g = g + wd * p
                v.mul_(m).add_(g)
                eta = lr / max(1, tau) if name == "salr" else lr
                if name == "sc" and tau > 0:
                    p.sub_(eta * (m ** tau * v + (1 - m ** tau) / (1 - m) * g))
                else:
                    p.sub_(eta * v)
    return torch.cat([p.detach().reshape(-1) for p in params])


def engine_pipeline(name, delay_cfg, data, lr, balance_costs=None):
    torch.manual_seed(0)
    model = build_model("resnet8")
    flat = FlatParams(model)
    costs = balance_costs or flat.sizes
    ranges = stage_ranges(flat.sizes, costs, len(delay_cfg.stage_delays or profile_delays(delay_cfg.stages)))
    cfg = OptimCfg(name=name, lr=lr, momentum=0.9, weight_decay=5e-4)
    engine = DelayedSGD(flat.data, flat.sizes, cfg, delay_cfg, seed=0, stages=ranges)
    drive(engine, model, flat, data, lr)
    return engine.w, flat.sizes, ranges


def stage_of_tensors(sizes, ranges):
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [next(s for s, (a, b) in enumerate(ranges) if a <= off < b) for off in offsets]


@pytest.mark.parametrize("name", ["sgdm", "sc", "lwp", "salr", "dcasgd"])
def test_pipeline_matches_per_stage_naive_reference(name):
    data = batches(10)
    delay = DelayCfg(kind="pipeline", stages=4)
    ours, sizes, ranges = engine_pipeline(name, delay, data, 0.05)
    theirs = naive_pipeline(name, stage_of_tensors(sizes, ranges), profile_delays(4), data, 0.05)
    assert float((ours - theirs.detach()).norm() / theirs.norm()) < 1e-5


def test_explicit_stage_delays_and_flops_balance():
    data = batches(8)
    torch.manual_seed(0)
    flops = tensor_flops(build_model("resnet8"), (3, 32, 32))
    delay = DelayCfg(kind="pipeline", stage_delays=[0, 5, 1])  # any order, any values
    ours, sizes, ranges = engine_pipeline("sgdm", delay, data, 0.05, balance_costs=flops)
    assert ranges != stage_ranges(sizes, sizes, 3)  # FLOPs cut elsewhere than parameter count
    theirs = naive_pipeline("sgdm", stage_of_tensors(sizes, ranges), [0, 5, 1], data, 0.05)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


def test_one_stage_pipeline_is_the_undelayed_run():
    data = batches(6)
    a, _, _ = engine_pipeline("sc", DelayCfg(kind="pipeline", stages=1), data, 0.05)
    b, _, _ = engine_pipeline("sc", DelayCfg(kind="pipeline", stage_delays=[0]), data, 0.05)
    torch.manual_seed(0)
    model = build_model("resnet8")
    flat = FlatParams(model)
    engine = DelayedSGD(flat.data, flat.sizes, OptimCfg(name="sc", lr=0.05, weight_decay=5e-4), DelayCfg(), 0)
    drive(engine, model, flat, data, 0.05)
    assert torch.equal(a, engine.w) and torch.equal(b, engine.w)


def test_pipeline_on_the_quadratic_matches_per_coordinate_recursion():
    """f = 1/2 sum lam_i w_i^2 with 6 coordinates in 3 stages: each coordinate is plain delayed
    SGDM with its stage's delay, a scalar recursion written out here."""
    lam = torch.tensor([0.1, 0.5, 1.0, 0.2, 0.7, 0.3], dtype=torch.float64)
    ranges, delays = [(0, 2), (2, 4), (4, 6)], [4, 2, 0]
    engine = DelayedSGD(torch.ones(6, dtype=torch.float64), [6], OptimCfg(name="sgdm", lr=0.1, weight_decay=0),
                        DelayCfg(kind="pipeline", stages=3), seed=0, stages=ranges)
    for _ in range(30):
        engine.step(lambda w_fwd: lam * w_fwd, 0.1)
    for i in range(6):
        d = delays[i // 2]
        w, v, hist = 1.0, 0.0, []
        for t in range(30):
            hist.append(w)
            g = float(lam[i]) * hist[max(t - d, 0)]
            v = 0.9 * v + g
            w -= 0.1 * v
        assert float(engine.w[i]) == pytest.approx(w, rel=1e-12)


def test_pipeline_run_records_its_stage_map_and_resumes_bitwise(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.epochs=2", "delay.kind=pipeline", "delay.stages=4",
                                              "delay.stage_balance=flops", "optim.name=sc"])
    whole = train_run(cfg, tmp_path / "a", "cpu", log=lambda s: None)
    stage_map = whole["stage_map"]
    assert [s["delay"] for s in stage_map] == [6, 4, 2, 0]
    assert stage_map[0]["tensors"][0] == 0 and stage_map[-1]["tensors"][1] == 23  # resnet8: 23 tensors
    assert sum(s["params"] for s in stage_map) == sum(p.numel() for p in build_model("resnet8").parameters())
    assert json.loads((tmp_path / "a" / "result.json").read_text())["stage_map"] == stage_map
    assert train_run(cfg, tmp_path / "b", "cpu", stop_after_epochs=1, log=lambda s: None) is None
    resumed = train_run(cfg, tmp_path / "b", "cpu", log=lambda s: None)
    assert resumed["train_loss"] == whole["train_loss"] and resumed["test_acc"] == whole["test_acc"]


# ---------------------------------------------------------------- traces and histograms

def test_trace_is_replayed_and_cycled(tmp_path):
    trace = tmp_path / "trace.txt"
    trace.write_text("# measured on a cluster\n3\n0\n\n5\n1\n")
    cfg = load_config(None, ["delay.kind=trace", f"delay.trace={trace}"])
    sampler = DelaySampler.from_config(cfg.delay, 0)
    assert [sampler(t) for t in range(9)] == [3, 0, 5, 1, 3, 0, 5, 1, 3]
    assert sampler.max == 5 and sampler.expected() == pytest.approx(9 / 4)


def test_trace_run_matches_naive_snapshots(tmp_path):
    trace = tmp_path / "trace.txt"
    trace.write_text("2\n0\n3\n1\n")
    data = batches(9)
    torch.manual_seed(0)
    model = build_model("resnet8")
    flat = FlatParams(model)
    delay = load_config(None, ["delay.kind=trace", f"delay.trace={trace}"]).delay
    engine = DelayedSGD(flat.data, flat.sizes, OptimCfg(name="sgdm", lr=0.05, weight_decay=0), delay, 0)
    ref = copy.deepcopy(model)
    drive(engine, model, flat, data, 0.05)
    # naive: torch SGD on a fresh copy, gradient at the snapshot tau_t = trace[t % 4] steps old
    torch.manual_seed(0)
    ref = build_model("resnet8")
    worker = copy.deepcopy(ref)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    snaps = []
    for t, (x, y) in enumerate(data):
        snaps.append([p.detach().clone() for p in ref.parameters()])
        with torch.no_grad():
            for q, s in zip(worker.parameters(), snaps[max(t - [2, 0, 3, 1][t % 4], 0)]):
                q.copy_(s)
        worker.zero_grad()
        F.cross_entropy(worker(x), y).backward()
        for p, q in zip(ref.parameters(), worker.parameters()):
            p.grad = q.grad.clone()
        opt.step()
    theirs = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    assert float((engine.w - theirs).norm() / theirs.norm()) < 1e-5


def test_histogram_draws_are_seeded_and_follow_the_weights():
    cfg = load_config(None, ["delay.kind=trace", "delay.histogram={0: 1, 4: 2, 9: 1}"])
    a, b = DelaySampler.from_config(cfg.delay, 0), DelaySampler.from_config(cfg.delay, 0)
    draws = [a(t) for t in range(8000)]
    assert draws == [b(t) for t in range(8000)]  # a pure function of (seed, t): resumable
    assert set(draws) == {0, 4, 9}
    for tau, share in ((0, 0.25), (4, 0.5), (9, 0.25)):
        assert draws.count(tau) / 8000 == pytest.approx(share, abs=0.03)
    assert a.max == 9


BAD_TRACES = [
    ("negative", "3\n-1\n", "line 2"),
    ("not an integer", "3\n2.5\n", "line 2"),
    ("text", "1\n2\nfast\n", "line 3"),
    ("above the buffer", "1\n\n40\n", "line 3"),
    ("empty", "# nothing\n", "delay.trace"),
]


@pytest.mark.parametrize("label,text,where", BAD_TRACES, ids=[c[0] for c in BAD_TRACES])
def test_bad_trace_exits_2_naming_file_and_line(tmp_path, capsys, label, text, where):
    trace = tmp_path / "trace.txt"
    trace.write_text(text)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"delay: {{kind: trace, trace: {trace}, steps: 32}}\nmodel: {{name: resnet8}}\n"
                   "data: {name: digits}\n")
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{trace}: {where}" in err
    assert not out.exists()


def test_missing_trace_and_misplaced_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(None, ["delay.kind=trace", f"delay.trace={tmp_path / 'nope.txt'}"])
    with pytest.raises(ConfigError, match="delay.stages: only for delay.kind: pipeline"):
        load_config(None, ["delay.stages=4"])
    with pytest.raises(ConfigError, match="delay.stage_delays: has 2 entries for 3 stages"):
        load_config(None, ["delay.kind=pipeline", "delay.stages=3", "delay.stage_delays=[1, 0]"])
    with pytest.raises(ConfigError, match="delay.stage_delays"):
        load_config(None, ["delay.kind=pipeline", "delay.stage_delays=[1, -1]"])
    with pytest.raises(ConfigError, match="delay.histogram"):
        load_config(None, ["delay.kind=trace", "delay.histogram={3: 1}", "delay.steps=2"])


# ---------------------------------------------------------------- Adam and AB-Adam

def run_adam(name, data, lr=1e-3, wd=0.01, rho=1.0, delay=0):
    torch.manual_seed(0)
    model = build_model("resnet8")
    flat = FlatParams(model)
    cfg = OptimCfg(name=name, lr=lr, weight_decay=wd, rho=rho, betas=[0.8, 0.99], eps=1e-6)
    engine = DelayedSGD(flat.data, flat.sizes, cfg, DelayCfg(steps=delay), 0)
    drive(engine, model, flat, data, lr)
    return engine.w


@pytest.mark.parametrize("name,torch_opt", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_at_delay_0_equals_torch_step_for_step(name, torch_opt):
    data = batches(12)
    torch.manual_seed(0)
    model = build_model("resnet8")
    opt = torch_opt(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6,
                    foreach=False)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    theirs = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ours = run_adam(name, data)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-6
    assert float((run_adam("ab_" + name, data, rho=0.0) - ours).norm()) == 0.0  # rho = 0: plain
    assert float((run_adam("ab_" + name, data) - ours).norm() / ours.norm()) > 1e-5  # rho = 1 brakes


def test_ab_adam_one_step_by_hand():
    """Second step of AB-Adam with a global cosine against Adam's first moment."""
    eps = 1e-8
    cfg = OptimCfg(name="ab_adam", lr=0.1, weight_decay=0.0, rho=1.0, ab_cosine="global", betas=[0.5, 0.9], eps=eps)
    engine = DelayedSGD(torch.zeros(2, dtype=torch.float64), [2], cfg, DelayCfg(), 0)
    g1, g2 = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    engine.step(lambda w: g1.clone(), 0.1)  # m = 0: cos 0, g1 unchanged
    engine.step(lambda w: g2.clone(), 0.1)
    m1, s1 = 0.5 * g1, 0.1 * g1 * g1
    w1 = -0.1 * (m1 / 0.5) / ((s1 / 0.1).sqrt() + eps)
    cos = float(g2 @ m1 / (g2.norm() * m1.norm()))
    g = (1 - cos) * g2
    m2, s2 = 0.5 * m1 + 0.5 * g, 0.9 * s1 + 0.1 * g * g
    w2 = w1 - 0.1 * (m2 / 0.75) / ((s2 / 0.19).sqrt() + eps)
    assert engine.w.tolist() == pytest.approx(w2.tolist(), rel=1e-12)


def test_adam_state_survives_a_checkpoint():
    data = batches(6)
    whole = run_adam("ab_adamw", data, delay=2)
    torch.manual_seed(0)
    model = build_model("resnet8")
    flat = FlatParams(model)
    cfg = OptimCfg(name="ab_adamw", lr=1e-3, weight_decay=0.01, betas=[0.8, 0.99], eps=1e-6)
    engine = DelayedSGD(flat.data, flat.sizes, cfg, DelayCfg(steps=2), 0)
    drive(engine, model, flat, data[:3], 1e-3)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in engine.state_dict().items()}
    state["optimizer"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state["optimizer"].items()}
    fresh = DelayedSGD(flat.data, flat.sizes, cfg, DelayCfg(steps=2), 0)
    fresh.load_state_dict(state)
    drive(fresh, model, flat, data[3:], 1e-3)
    assert torch.equal(fresh.w, whole)


def test_flat_profile_is_the_constant_delay_of_the_first_stage():
    """stage_profile flat: every stage at 2(S-1), i.e. exactly a constant delay (bitwise)."""
    data = batches(8)
    for name in ("sc", "lwp"):
        flat, _, _ = engine_pipeline(name, DelayCfg(kind="pipeline", stages=3, stage_profile="flat"), data, 0.05)
        torch.manual_seed(0)
        model = build_model("resnet8")
        params = FlatParams(model)
        engine = DelayedSGD(params.data, params.sizes, OptimCfg(name=name, lr=0.05, weight_decay=5e-4),
                            DelayCfg(steps=4), 0)
        drive(engine, model, params, data, 0.05)
        assert torch.equal(flat, engine.w)


@pytest.mark.parametrize("name", ["sgdm", "sc", "salr"])
def test_trace_on_the_quadratic_matches_a_scalar_recursion(tmp_path, name):
    """f = lam/2 w^2, delays replayed from a trace: each step's gradient lam * w_{t - tau_t}, SC and
    salr with the actual staleness min(tau_t, t) -- written out as a scalar recursion."""
    trace = tmp_path / "trace.txt"
    trace.write_text("3\n0\n5\n1\n2\n")
    taus = [3, 0, 5, 1, 2]
    delay = load_config(None, ["delay.kind=trace", f"delay.trace={trace}"]).delay
    lam, lr, m = 0.7, 0.05, 0.9
    engine = DelayedSGD(torch.ones(1, dtype=torch.float64), [1],
                        OptimCfg(name=name, lr=lr, momentum=m, weight_decay=0), delay, seed=0)
    w, v, hist = 1.0, 0.0, []
    for t in range(25):
        engine.step(lambda w_fwd: lam * w_fwd, lr)
        hist.append(w)
        tau = min(taus[t % 5], t)
        g = lam * hist[t - tau]
        v = m * v + g
        eta = lr / max(1, tau) if name == "salr" else lr
        if name == "sc" and tau > 0:
            w -= eta * (m ** tau * v + (1 - m ** tau) / (1 - m) * g)
        else:
            w -= eta * v
        assert float(engine.w) == pytest.approx(w, rel=1e-12)


def test_adam_on_the_quadratic_matches_torch():
    """D = 0 Adam and AdamW on f = 1/2 sum lam_i w_i^2 against torch.optim on the same loss."""
    lam = torch.linspace(0.1, 2.0, 5, dtype=torch.float64)
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        cfg = OptimCfg(name=name, lr=0.05, weight_decay=0.1, betas=[0.8, 0.95], eps=1e-8)
        engine = DelayedSGD(torch.ones(5, dtype=torch.float64), [5], cfg, DelayCfg(), seed=0)
        p = torch.ones(5, dtype=torch.float64, requires_grad=True)
        opt = cls([p], lr=0.05, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-8, foreach=False)
        for _ in range(40):
            engine.step(lambda w_fwd: lam * w_fwd, 0.05)
            opt.zero_grad()
            (0.5 * (lam * p * p).sum()).backward()
            opt.step()
        assert torch.allclose(engine.w, p.detach(), rtol=1e-12, atol=1e-14)
