"""Packing: K runs as one grouped-convolution network equal K separate runs."""

import json

import pytest
import torch

from abexp import io
from abexp.config import load_config
from abexp.train.models import PackedCifarResNet, build_model
from abexp.train.packed import PackedRun, pack_key, train_pack
from abexp.train.run import Run
from abexp.train.start import train_run

BASE = ["data.name=digits", "model.name=resnet8", "data.subset=128", "data.test_subset=64",
        "train.batch_size=32", "train.epochs=2", "schedule.name=constant"]
RUNS = [["seed=0", "optim.name=sgdm", "delay.steps=0", "optim.lr=0.01"],
        ["seed=1", "optim.name=ab", "delay.steps=3", "optim.lr=0.02", "optim.rho=0.5"],
        ["seed=2", "optim.name=sc", "delay.steps=2", "optim.momentum=0.8", "optim.lr=0.01"]]


def configs(extra=()):
    return [load_config(None, BASE + r + list(extra)) for r in RUNS]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_packed_network_computes_each_run_and_round_trips_state():
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model("resnet20"))
    packed = PackedCifarResNet(20, 3).load_runs(models)
    for k, m in enumerate(models):
        state = packed.run_state(k)
        assert all(torch.equal(state[n], v) for n, v in m.state_dict().items())
    xs = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    packed.eval(), [m.eval() for m in models]
    out = packed(torch.stack(xs, 1).flatten(1, 2))
    for k, m in enumerate(models):
        assert torch.allclose(out[:, k], m(xs[k]), atol=1e-5)


def test_one_packed_step_equals_three_separate_steps(tmp_path):
    cfgs = configs()
    pack = PackedRun(cfgs, [tmp_path / str(i) for i in range(3)], "cpu", log=lambda s: None)
    singles = [Run(c, tmp_path / "s", "cpu", log=lambda s: None) for c in cfgs]
    batches = [next(iter(b.epoch(0))) for b in pack.batches]
    pack.train_step([b[0] for b in batches], [b[1] for b in batches], [c.optim.lr for c in cfgs])
    for run, (x, y), engine in zip(singles, batches, pack.engines):
        assert torch.equal(x, next(iter(run.batches.epoch(0)))[0])  # each run's own data order
        run.train_step(x, y, run.cfg.optim.lr)
        assert rel(engine.w, run.engine.w) < 1e-6
    assert rel(pack.engines[0].w, pack.engines[1].w) > 0.1  # the runs really differ


def test_packed_group_of_3_equals_3_separate_runs(tmp_path):
    cfgs = configs()
    packed = train_pack(cfgs, [tmp_path / f"p{i}" for i in range(3)], "cpu", log=lambda s: None)
    for i, cfg in enumerate(cfgs):
        single = train_run(cfg, tmp_path / f"s{i}", "cpu", log=lambda s: None)
        a, b = io.load_torch(tmp_path / f"p{i}" / "model.pt"), io.load_torch(tmp_path / f"s{i}" / "model.pt")
        params = [n for n, _ in build_model("resnet8").named_parameters()]
        wa = torch.cat([a[n].reshape(-1) for n in params])
        wb = torch.cat([b[n].reshape(-1) for n in params])
        # grouped vs plain convolutions round differently (~1e-7 per step); 8 steps amplify it
        assert rel(wa, wb) < 1e-3
        assert packed[i]["steps"] == single["steps"] == 8 and packed[i]["status"] == "completed"
        rows_a = [json.loads(l) for l in (tmp_path / f"p{i}" / "metrics.jsonl").read_text().splitlines()]
        rows_b = [json.loads(l) for l in (tmp_path / f"s{i}" / "metrics.jsonl").read_text().splitlines()]
        for ra, rb in zip(rows_a, rows_b):
            assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-3)


def test_an_interrupted_pack_resumes_packed_or_unpacked(tmp_path):
    cfgs = configs()
    outs = [tmp_path / f"p{i}" for i in range(3)]
    assert train_pack(cfgs, outs, "cpu", log=lambda s: None, stop_after_epochs=1) is None
    assert all((o / "checkpoint.pt").exists() for o in outs)
    single = train_run(cfgs[0], outs[0], "cpu", log=lambda s: None)  # the checkpoint format is Run's
    assert single["epochs_completed"] == 2
    rest = train_pack(cfgs, outs, "cpu", log=lambda s: None)
    assert [r["epochs_completed"] for r in rest] == [2, 2, 2]


def test_pack_key_groups_compatible_runs_only(tmp_path):
    a, b, c = configs()
    assert pack_key(a) == pack_key(b) == pack_key(c)
    assert pack_key(load_config(None, BASE + ["train.batch_size=16"])) != pack_key(a)
    assert pack_key(load_config(None, BASE + ["train.micro_batches=2"])) is None
    # Muon's engine needs each tensor's shape, which a pack's run-major vector does not carry
    assert pack_key(load_config(None, BASE + ["optim.name=muon", "optim.muon_params=all_2d"])) is None
    # a trace of delays packs; an async run's trace (each update's batch) is a replay: Run's alone
    (tmp_path / "delays.txt").write_text("0\n1\n")
    (tmp_path / "trace.txt").write_text("0 1\n1 0\n")
    delays, batches = (load_config(None, BASE + ["delay.kind=trace", f"delay.trace={tmp_path / f}"])
                       for f in ("delays.txt", "trace.txt"))
    assert pack_key(delays) is not None and pack_key(batches) is None


def test_a_run_diverging_mid_epoch_stops_where_it_would_unpacked(tmp_path):
    """The divergence check runs every train.divergence_check_every steps inside a pack too: the
    diverged run reports the same steps and status as alone, and its pack-mates train on."""
    extra = ["train.divergence_check_every=2", "data.subset=256"]
    cfgs = [load_config(None, BASE + RUNS[0] + extra),
            load_config(None, BASE + ["seed=1", "optim.name=sgdm", "optim.lr=1.0e+8"] + extra)]
    packed = train_pack(cfgs, [tmp_path / "p0", tmp_path / "p1"], "cpu", log=lambda s: None)
    alone = [train_run(c, tmp_path / f"s{i}", "cpu", log=lambda s: None) for i, c in enumerate(cfgs)]
    assert alone[1]["status"] == packed[1]["status"] == "diverged"
    assert packed[1]["steps"] == alone[1]["steps"] < 8  # stopped inside the first epoch
    assert packed[0]["status"] == alone[0]["status"] == "completed"
    assert packed[0]["steps"] == alone[0]["steps"] == 16


MIXED = [["seed=0", "optim.name=sgdm", "delay.steps=0", "optim.lr=0.01"],
         ["seed=1", "optim.name=ab", "delay.steps=3", "optim.lr=0.02", "optim.rho=0.5"],
         ["seed=2", "optim.name=sc", "delay.steps=2", "optim.momentum=0.8", "optim.lr=0.01"],  # its own engine
         ["seed=3", "optim.name=sgdm", "optim.nesterov=true", "delay.kind=uniform", "delay.steps=4"],
         ["seed=4", "optim.name=ab", "delay.kind=geometric", "delay.mean=2", "delay.steps=5",
          "optim.weight_decay_on=stale", "optim.momentum=0.5", "optim.lr=0.03"],
         ["seed=5", "optim.name=ab", "delay.steps=1", "optim.lr=0.05", "optim.weight_decay=0"]]


def test_the_vectorised_update_equals_each_runs_own_engine_bitwise(tmp_path):
    """Two epochs (8 steps, cosine schedule: a new lr every step) of a pack of mixed rules and
    delays, vectorised and with every run's own engine in a loop (the code before abexp.sim.batched):
    every run's engine state — weights, ring, velocity, brake statistics, step — is bitwise the same."""
    cfgs = [load_config(None, BASE + r + ["schedule.name=cosine"]) for r in MIXED]
    outs = [tmp_path / str(i) for i in range(len(cfgs))]
    loop = PackedRun(cfgs, outs, "cpu", log=lambda s: None, vectorise=False)
    together = PackedRun(cfgs, outs, "cpu", log=lambda s: None)
    assert loop.together is None and together.n_together == 5 and together.order[-1] == 2
    for _ in range(2):
        assert loop.train_epoch() == together.train_epoch()  # the same losses and accuracies
    for i in range(len(cfgs)):
        a, b = loop.checkpoint(i)["engine"], together.checkpoint(i)["engine"]
        assert a["t"] == b["t"] == 8
        assert torch.equal(a["w"], b["w"]) and torch.equal(a["history"], b["history"])
        assert a["optimizer"].keys() == b["optimizer"].keys()
        for key, value in a["optimizer"].items():
            if key == "brake":
                assert torch.equal(value["sums"], b["optimizer"]["brake"]["sums"])
                assert value["count"] == b["optimizer"]["brake"]["count"] > 0
            else:
                assert torch.equal(value, b["optimizer"][key])
    assert rel(together.engines[0].w, together.engines[3].w) > 0.1  # the runs really differ


def test_a_vectorised_runs_checkpoint_is_a_single_runs(tmp_path):
    """An unpacked run's checkpoint restored into a vectorised pack gives back the same state,
    and the pack's checkpoint holds that run's tensors only (not the pack's shared buffers)."""
    cfg = configs()[1]  # AB at delay 3
    assert train_run(cfg, tmp_path / "s", "cpu", log=lambda s: None, stop_after_epochs=1) is None
    state = io.load_torch(tmp_path / "s" / "checkpoint.pt")
    pack = PackedRun(configs(), [tmp_path / str(i) for i in range(3)], "cpu", log=lambda s: None)
    assert 1 in pack.order[:pack.n_together]
    pack.restore(1, state)
    got = pack.checkpoint(1)["engine"]
    assert got["t"] == state["engine"]["t"] == 4
    for key in ("w", "history"):
        assert torch.equal(got[key], state["engine"][key])
        assert got[key].untyped_storage().nbytes() == got[key].numel() * got[key].element_size()
    assert torch.equal(got["optimizer"]["v"], state["engine"]["optimizer"]["v"])
    assert torch.equal(got["optimizer"]["brake"]["sums"], state["engine"]["optimizer"]["brake"]["sums"])
