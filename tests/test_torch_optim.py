"""abexp.DelayedOptimizer against independent references: torch.optim at D = 0 (bitwise), a naive
delayed SGD written here (which weights the model holds when), abexp's own run path (Run.train_step)
under delay, an uninterrupted run for resume, and the README example run as written."""

import copy
import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import abexp
from abexp.config import DelayCfg, OptimCfg, load_config
from abexp.registry import RULES
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.sim.schedule import lr_at
from abexp.train.run import Run
from abexp.train.torch_optim import rule_options
from conftest import TINY

README = Path(__file__).resolve().parent.parent / "README.md"


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))


def data(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen))
            for _ in range(steps)]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("name,ref,options", [
    ("sgdm", torch.optim.SGD, dict(momentum=0.9, weight_decay=5e-4)),
    ("sgdm", torch.optim.SGD, dict(momentum=0.9, weight_decay=5e-4, nesterov=True)),
    ("sgdm", torch.optim.SGD, dict(momentum=0.0, weight_decay=0.0)),
    ("adam", torch.optim.Adam, dict(weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    ("adamw", torch.optim.AdamW, dict(weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8)),
])
def test_delay_0_equals_torch_optim_bitwise_after_200_steps(name, ref, options):
    batches = data(200)
    ours, theirs = mlp(), mlp()
    train(ours, abexp.DelayedOptimizer(ours.parameters(), name, lr=0.01, delay=0, **options), batches)
    train(theirs, ref(theirs.parameters(), lr=0.01, **options), batches)
    assert torch.equal(flat(ours), flat(theirs))
    assert not torch.equal(flat(theirs), flat(mlp()))  # it trained


def test_schedulers_set_the_lr_the_engine_uses():
    """Under StepLR at D = 0 the trajectory is torch.optim.SGD's under the same scheduler."""
    batches = data(30)
    ours, theirs = mlp(), mlp()
    opt = abexp.DelayedOptimizer(ours.parameters(), "sgdm", lr=0.05, momentum=0.9, weight_decay=0.0)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    train(ours, opt, batches, torch.optim.lr_scheduler.StepLR(opt, 10, gamma=0.1))
    train(theirs, ref, batches, torch.optim.lr_scheduler.StepLR(ref, 10, gamma=0.1))
    assert torch.equal(flat(ours), flat(theirs))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1 ** 3)


def test_model_holds_the_stale_weights_and_current_weights_swaps_in_the_latest():
    """Naive delayed SGD: snapshots of every step's weights, the gradient of step t taken on a
    second model at snapshot t - D, applied by torch.optim.SGD."""
    delay, batches = 3, data(12)
    model, ref, stale = mlp(), mlp(), mlp()
    opt = abexp.DelayedOptimizer(model.parameters(), "sgdm", lr=0.1, momentum=0.9, weight_decay=1e-3,
                                 delay=delay)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    snapshots = [flat(ref).clone()]
    assert torch.equal(flat(model), snapshots[0])
    for t, (x, y) in enumerate(batches):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(snapshots[max(t - delay, 0)], stale.parameters())
        stale.zero_grad()
        F.cross_entropy(stale(x), y).backward()
        for p, s in zip(ref.parameters(), stale.parameters()):
            p.grad = s.grad.clone()
        ref_opt.step()
        snapshots.append(flat(ref).clone())
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        # the model holds the weights the next gradient is taken at: those of step t + 1 - D
        assert torch.equal(flat(model), snapshots[max(t + 1 - delay, 0)]), t
        assert opt.staleness == [min(delay, t + 1)]
        with opt.current_weights():
            assert torch.equal(flat(model), snapshots[t + 1])
        assert torch.equal(flat(model), snapshots[max(t + 1 - delay, 0)])
    assert not torch.equal(snapshots[-1], snapshots[-1 - delay])


def test_grads_set_to_none_by_the_model_still_reach_the_engine():
    """model.zero_grad() frees .grad (set_to_none): the new grads are copied into the engine's
    buffer, a parameter without one counts as a zero gradient."""
    batches = data(10)
    a, b = mlp(), mlp()
    opt_a = abexp.DelayedOptimizer(a.parameters(), "ab", lr=0.05, delay=2)
    opt_b = abexp.DelayedOptimizer(b.parameters(), "ab", lr=0.05, delay=2)
    train(a, opt_a, batches)
    for x, y in batches:
        b.zero_grad(set_to_none=True)
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
    assert torch.equal(flat(a), flat(b))
    with opt_a.current_weights(), opt_b.current_weights():
        assert torch.equal(flat(a), flat(b))


# ---------------------------------------------------------------- abexp's own run path

def run_path_and_ours(tmp_path, overrides, groups_as_stages=False):
    """One epoch of 12 steps, the same batches through Run.train_step (abexp run's step, lr from
    lr_at) and through DelayedOptimizer on a copy of the run's initial model, lr from torch's MultiStepLR."""
    cfg = load_config(overrides=TINY + ["train.epochs=1", "train.batch_size=16", "data.subset=192",
                                        "seed=3"] + overrides)
    run = Run(cfg, tmp_path / "run", device="cpu", log=lambda line: None)
    model = copy.deepcopy(run.model)
    run.initial = run.engine.w.clone()
    batches = list(run.batches.epoch(0))
    for x, y in batches:
        run.train_step(x, y, lr_at(run.engine.t, cfg.optim.lr, run.total_steps, run.steps_per_epoch,
                                   cfg.schedule))
    params = list(model.parameters())
    if groups_as_stages:
        params = [{"params": params[a:b]} for a, b in (s["tensors"] for s in run.stage_map)]
    delay = {**cfg.delay.model_dump(exclude_defaults=True), "seed": cfg.seed}
    options = {k: getattr(cfg.optim, k) for k in rule_options(cfg.optim.name)}
    opt = abexp.DelayedOptimizer(params, cfg.optim.name, lr=cfg.optim.lr, delay=delay, **options)
    milestones = [round(m * run.total_steps) for m in cfg.schedule.milestones]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, cfg.schedule.gamma) \
        if cfg.schedule.name == "multistep" else None
    for x, y in batches:
        opt.zero_grad()
        with opt.backward_weights():
            F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    assert sched is None or sched.get_last_lr()[0] < cfg.optim.lr  # the milestone was passed
    return run, model, opt


@pytest.mark.parametrize("overrides,groups_as_stages", [
    (["optim.name=sgdm", "delay.steps=3"], False),
    (["optim.name=ab", "delay.kind=uniform", "delay.steps=5"], False),
    (["optim.name=lwp", "delay.steps=2", "schedule.name=multistep", "schedule.milestones=[0.5]"], False),
    (["optim.name=dcasgd", "delay.kind=geometric", "delay.steps=6", "delay.mean=2.0"], False),
    (["optim.name=ab_adamw", "optim.lr=0.003", "delay.steps=2"], False),
    (["optim.name=sc", "delay.kind=pipeline", "delay.stages=3"], True),
    (["optim.name=ab_lwp", "delay.kind=pipeline", "delay.stages=2"], False),
    (["optim.name=pipemare", "delay.kind=pipeline", "delay.stages=2", "delay.stashing=false"], True),
])
def test_under_delay_equals_the_run_path_bitwise(tmp_path, overrides, groups_as_stages):
    run, model, opt = run_path_and_ours(tmp_path, overrides, groups_as_stages)
    assert opt.engine.t == run.engine.t == 12
    with opt.current_weights():
        assert torch.equal(flat(model), run.engine.w)
    for ours, theirs in zip(model.buffers(), run.model.buffers()):  # BN statistics: same passes
        assert torch.equal(ours, theirs)
    assert not torch.equal(run.engine.w, run.initial)  # it trained


@pytest.mark.parametrize("name", ["lwp", "ab_lwp", "sc_lwp"])
def test_weight_prediction_under_a_scheduler_equals_the_engine_driven_directly(name):
    """LWP looks ahead by the step's lr, which the scheduler sets after the previous step():
    the engine driven as run.py drives it (begin and finish with lr_t) is the reference."""
    batches, lrs = data(14), [0.05] * 5 + [0.05 * 0.2] * 5 + [0.05 * 0.2 * 0.2] * 4  # MultiStepLR's
    ref = mlp()
    flat_ref = FlatParams(ref)
    engine = DelayedSGD(flat_ref.data, flat_ref.sizes, OptimCfg(name=name, lr=0.05), DelayCfg(steps=3), 0)
    for (x, y), lr in zip(batches, lrs):
        def grad_fn(w_fwd):
            flat_ref.data.copy_(w_fwd)
            flat_ref.grad.zero_()
            F.cross_entropy(ref(x), y).backward()
            return flat_ref.grad
        engine.step(grad_fn, lr)
    model = mlp()
    opt = abexp.DelayedOptimizer(model.parameters(), name, lr=0.05, delay=3)
    train(model, opt, batches, torch.optim.lr_scheduler.MultiStepLR(opt, [5, 10], gamma=0.2))
    with opt.current_weights():
        assert torch.equal(flat(model), engine.w)


# ---------------------------------------------------------------- state and resume

def test_state_dict_resumes_bitwise_with_its_scheduler():
    batches = data(24)

    def make(seed):
        model = mlp(seed)
        opt = abexp.DelayedOptimizer(model.parameters(), "ab", lr=0.05, momentum=0.9,
                                     delay={"kind": "uniform", "steps": 4, "seed": 7})
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.5)

    whole, opt_whole, sched = make(0)
    train(whole, opt_whole, batches, sched)
    first, opt, sched = make(0)
    train(first, opt, batches[:10], sched)
    saved = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, saved)
    train(first, opt, batches[10:13], sched)  # the saved state is a copy: training on leaves it
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed, opt2, sched2 = make(5)  # other initial weights: all come from the state
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    train(resumed, opt2, batches[10:], sched2)
    assert opt2.engine.t == 24 and opt2.param_groups[0]["lr"] == 0.05 * 0.5 ** 4
    assert torch.equal(flat(resumed), flat(whole))  # the stale weights
    stale = flat(resumed)
    with opt2.current_weights(), opt_whole.current_weights():
        assert torch.equal(flat(resumed), flat(whole))
        assert not torch.equal(flat(resumed), stale)


def test_state_dict_of_another_rule_or_delay_is_refused():
    a = abexp.DelayedOptimizer(mlp().parameters(), "ab", lr=0.1, delay=2)
    b = abexp.DelayedOptimizer(mlp().parameters(), "ab", lr=0.1, delay=3)
    with pytest.raises(ValueError, match="delay"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not a DelayedOptimizer state"):
        b.load_state_dict(torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict())


# ---------------------------------------------------------------- names and bad input

def test_every_rule_name_builds_and_steps():
    for name in RULES.names():
        model = mlp()
        delay = {"kind": "pipeline", "stages": 2, "stashing": False} if name == "pipemare" else 2
        opt = abexp.DelayedOptimizer(model.parameters(), name, lr=0.01, delay=delay)
        for x, y in data(5):  # adl: one update per 4 gradients
            opt.zero_grad()
            with opt.backward_weights():
                F.cross_entropy(model(x), y).backward()
            opt.step()
        with opt.current_weights():
            assert not torch.equal(flat(model), flat(mlp())), name


def test_bad_input_is_one_clear_error():
    params = list(mlp().parameters())
    with pytest.raises(ValueError, match="unknown update rule 'sgd'.*sgdm, ab, sc"):
        abexp.DelayedOptimizer(params, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="'betas' is not read by rule 'sgdm'"):
        abexp.DelayedOptimizer(params, "sgdm", lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="optim.momentum"):
        abexp.DelayedOptimizer(params, "sgdm", lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="delay.mean"):
        abexp.DelayedOptimizer(params, "sgdm", lr=0.1, delay={"kind": "geometric", "steps": 4})
    with pytest.raises(ValueError, match="async"):
        abexp.DelayedOptimizer(params, "sgdm", lr=0.1, delay={"kind": "async", "workers": 2})
    with pytest.raises(ValueError, match="3 pipeline stages but 2 param groups"):
        abexp.DelayedOptimizer([{"params": params[:2]}, {"params": params[2:]}], "sgdm", lr=0.1,
                               delay={"kind": "pipeline", "stages": 3})
    with pytest.raises(ValueError, match="differ in 'weight_decay'"):
        abexp.DelayedOptimizer([{"params": params[:2], "weight_decay": 0.0}, {"params": params[2:]}],
                               "sgdm", lr=0.1)
    with pytest.raises(ValueError, match="lr must be"):
        abexp.DelayedOptimizer(params, "sgdm", lr=-1.0)


def test_per_group_delays_are_pipeline_stages():
    params = list(mlp().parameters())
    opt = abexp.DelayedOptimizer([{"params": params[:2], "delay": 4}, {"params": params[2:], "delay": 0}],
                                 "sgdm", lr=0.1)
    assert opt.delay_cfg.kind == "pipeline" and opt.delay_cfg.stage_delays == [4, 0]
    assert opt.engine.ranges == [(0, 20 * 32 + 32), (20 * 32 + 32, 20 * 32 + 32 + 32 * 5 + 5)]


def test_groups_with_different_lrs_are_refused_at_the_step():
    model = mlp()
    opt = abexp.DelayedOptimizer(model.parameters(), "sgdm", lr=0.1)
    opt.param_groups[0]["lr"] = 0.2  # one group: fine
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    params = list(mlp().parameters())
    opt = abexp.DelayedOptimizer([{"params": params[:2]}, {"params": params[2:]}], "sgdm", lr=0.1)
    opt.param_groups[1]["lr"] = 0.01
    with pytest.raises(ValueError, match="differ in 'lr'"):
        opt.step()


def test_unstashed_pipeline_without_backward_weights_is_refused():
    model = mlp()
    opt = abexp.DelayedOptimizer(model.parameters(), "sgdm", lr=0.1,
                                 delay={"kind": "pipeline", "stages": 2, "stashing": False})
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="backward_weights"):
        opt.step()


# ---------------------------------------------------------------- the README example

def test_the_readme_example_runs_as_written():
    text = README.read_text()
    section = text.split("### Your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 22
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["opt"].engine.t > 0


def test_a_state_dict_from_before_the_rule_records_still_loads():
    """lwp_lookahead and dc_adaptive became options (the rules' records); a state dict saved
    without them held their defaults, so it loads where they are default and nowhere else."""
    opt = abexp.DelayedOptimizer(mlp().parameters(), "lwp", lr=0.1, delay=2)
    state = opt.state_dict()
    for key in ("lwp_lookahead", "dc_adaptive"):
        del state["abexp"]["rule"][key]
    abexp.DelayedOptimizer(mlp().parameters(), "lwp", lr=0.1, delay=2).load_state_dict(state)
    with pytest.raises(ValueError, match="the state is of rule"):
        abexp.DelayedOptimizer(mlp().parameters(), "lwp", lr=0.1, delay=2,
                               lwp_lookahead="momentum").load_state_dict(state)
