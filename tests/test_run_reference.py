"""A whole Run against a naive re-implementation written here from the rules' definitions:
past weights kept as a list of snapshots, the stale gradient on a second model, the lr schedule
recomputed from its formula, AB per tensor and weight decay by hand, evaluation on a fresh model
holding the current weights. Catches a schedule read one step late, weight decay applied after
AB's scaling, and evaluation at the stale weights."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from abexp.config import load_config
from abexp.train.models import build_model
from abexp.train.run import Run

BASE = ["data.name=digits", "model.name=resnet8", "data.subset=128", "data.test_subset=64",
        "train.batch_size=32", "train.epochs=2", "optim.lr=0.05", "optim.momentum=0.9",
        "optim.weight_decay=0.01", "schedule.name=cosine", "schedule.warmup_epochs=1",
        "eval.bn=running"]


def schedule(step, base_lr, total, warmup):
    """Linear warmup from 0 over ``warmup`` steps, then cosine to 0 (written from the formula)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def naive_run(cfg, batches, steps_per_epoch):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name)
    worker = copy.deepcopy(model)  # the stale replica
    params = list(model.parameters())
    snapshots = [[p.detach().clone() for p in params]]
    velocity = [torch.zeros_like(p) for p in params]
    o, D = cfg.optim, cfg.delay.steps
    total = steps_per_epoch * cfg.train.epochs
    t = 0
    for epoch in range(cfg.train.epochs):
        for x, y in batches.epoch(epoch):
            lr = schedule(t, o.lr, total, steps_per_epoch * cfg.schedule.warmup_epochs)
            with torch.no_grad():
                for q, s in zip(worker.parameters(), snapshots[max(t - D, 0)]):
                    q.copy_(s)
            worker.zero_grad()
            F.cross_entropy(worker(x), y).backward()
            with torch.no_grad():
                for p, q, v in zip(params, worker.parameters(), velocity):
                    g = q.grad + o.weight_decay * p
                    if o.name == "ab":
                        denom = g.norm() * v.norm()
                        cos = float((g * v).sum() / denom) if denom > 0 else 0.0
                        g = (1 - o.rho * cos) * g
                    v.mul_(o.momentum).add_(g)
                    p.sub_(lr * v)
            snapshots.append([p.detach().clone() for p in params])
            t += 1
    # the real worker's BN statistics were gathered on the stale forward passes too
    model.load_state_dict({**model.state_dict(), **{k: b for k, b in worker.state_dict().items()
                                                     if "running" in k or "num_batches" in k}})
    return model, snapshots


@pytest.mark.parametrize("name,delay", [("sgdm", 0), ("sgdm", 2), ("ab", 2)])
def test_run_matches_the_naive_reference(tmp_path, name, delay):
    cfg = load_config(None, BASE + [f"optim.name={name}", f"delay.steps={delay}"])
    run = Run(cfg, tmp_path, "cpu", log=lambda s: None)
    run.fit()
    ref, snapshots = naive_run(cfg, run.batches, run.steps_per_epoch)
    ours = run.engine.w
    theirs = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    # float32 rounding differs between the two (fused vs separate ops) and grows with training:
    # measured 6.1e-5 after 8 steps on an Intel Xeon (Sapphire Rapids), under 2e-5 on an AMD
    # EPYC, while a schedule read one step late gives 9.2e-3: the bound sits between the two
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-3
    # the final test metrics are those of the current weights, not of the stale ones
    (loss, acc), = run.evaluate()
    ref.eval()
    with torch.no_grad():
        x, y = next(run.batches.test(1000))
        ref_loss = float(F.cross_entropy(ref(x), y))
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    if delay:
        with torch.no_grad():
            for p, s in zip(ref.parameters(), snapshots[-1 - delay]):
                p.copy_(s)
            stale_loss = float(F.cross_entropy(ref(x), y))
        assert abs(stale_loss - ref_loss) > 1e-3 * ref_loss
