"""A stop signal mid-epoch: checkpoint at the next step boundary, resume bitwise."""

import json
import os
import signal

import pytest
import torch

from abexp import io
from abexp.train import preempt
from abexp.config import load_config
from abexp.train.run import RESULT, Run
from abexp.train.start import train_run


@pytest.fixture
def signals():
    old = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    preempt.install()
    yield
    preempt.reset()
    for s, handler in old.items():
        signal.signal(s, handler)


def metric_rows(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "elapsed_s")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_epoch_checkpoints_and_resumes_bitwise(tmp_path, tiny_overrides, monkeypatch, signals, sig):
    cfg = load_config(None, tiny_overrides + ["train.epochs=2", "optim.name=ab", "delay.steps=3",
                                              "schedule.name=cosine"])
    full, part = tmp_path / "full", tmp_path / "part"
    train_run(cfg, full, device="cpu", log=lambda s: None)

    steps = {"n": 0}
    plain_step = Run.train_step

    def step_then_signal(self, x, y, lr):
        plain_step(self, x, y, lr)
        steps["n"] += 1
        if steps["n"] == 11:  # epoch 2 (8 steps an epoch), its third step
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(Run, "train_step", step_then_signal)
    with pytest.raises(preempt.Preempted):
        train_run(cfg, part, device="cpu", log=lambda s: None)
    state = io.load_torch(part / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"], state["engine"]["t"]) == (1, 3, 11)
    assert not (part / RESULT).exists()
    assert [r["epoch"] for r in metric_rows(part)] == [1]

    monkeypatch.setattr(Run, "train_step", plain_step)
    preempt.reset()
    train_run(cfg, part, device="cpu", log=lambda s: None)
    a, b = io.load_torch(full / "model.pt"), io.load_torch(part / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(full) == metric_rows(part)  # the split epoch's loss and accuracy too


def test_signal_before_training_leaves_nothing_half_done(tmp_path, tiny_overrides, signals):
    cfg = load_config(None, tiny_overrides + ["train.epochs=1"])
    os.kill(os.getpid(), signal.SIGUSR2)
    with pytest.raises(preempt.Preempted):
        train_run(cfg, tmp_path, device="cpu", log=lambda s: None)
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / RESULT).exists()
