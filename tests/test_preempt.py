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


def test_usr1_to_the_launcher_of_two_ddp_ranks_stops_both_at_one_step_and_resumes_bitwise(tmp_path):
    """`abexp train --nproc 2` (gloo): SLURM signals the launcher only. It passes the stop on to
    torchrun's ranks, which agree on the step (each may hear it at another): both stop after
    the same step, rank 0 saves a mid-epoch checkpoint, and the resumed run ends bitwise equal
    to an uninterrupted one (weights and every metrics line, the split epoch's sums included)."""
    import re
    import subprocess
    import sys
    import time
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 0\n")
    sets = ["data.name=digits", "model.name=resnet8", "data.subset=512", "data.test_subset=64",
            "train.batch_size=8", "train.epochs=2", "optim.name=ab", "delay.steps=3",
            "schedule.name=cosine", "optim.lr=0.05", "train.divergence_check_every=2"]
    base = [sys.executable, "-m", "abexp.cli", "train", str(cfg), "--device", "cpu", "--nproc", "2"]
    base += [arg for s in sets for arg in ("--set", s)]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    full, part = tmp_path / "full", tmp_path / "part"
    assert subprocess.run(base + ["--out", str(full)], env=env, capture_output=True).returncode == 0

    launcher = subprocess.Popen(base + ["--out", str(part)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (part / "metrics.jsonl").exists() or not (part / "metrics.jsonl").read_text():
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.05)
    launcher.send_signal(signal.SIGUSR1)  # epoch 1 is done: epoch 2 (64 steps) has begun
    err = launcher.communicate(timeout=300)[1]
    assert launcher.returncode == 0, err
    stops = dict(re.findall(r"rank (\d): stop signal: stopped after (epoch \d+ step \d+)", err))
    assert stops.keys() == {"0", "1"} and stops["0"] == stops["1"], err
    state = io.load_torch(part / "checkpoint.pt")
    assert f"epoch {state['epoch'] + 1} step {state['step_in_epoch']}" == stops["0"]
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < 64 and state["step_in_epoch"] % 2 == 0
    assert not (part / RESULT).exists()

    assert subprocess.run(base + ["--out", str(part)], env=env, capture_output=True).returncode == 0
    a, b = io.load_torch(full / "model.pt"), io.load_torch(part / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(full) == metric_rows(part)


def test_a_slurm_worker_passes_the_stop_on_to_its_runs_ranks(tmp_path, monkeypatch, signals):
    """The whole chain: USR1 to the worker (SLURM signals it alone) reaches the ranks of its
    two-process run through the launcher; the run stops mid-epoch with a checkpoint, counts as
    pre-empted (not failed), and the next worker finishes it from there."""
    import threading
    import time
    from abexp.lab.runner import runs_dir, worker_loop
    from abexp.lab.spec import load_spec
    spec = tmp_path / "s.yaml"
    # 256 steps per epoch: the stop must land in epoch 2, whose length is the margin the
    # signal has to cross worker -> launcher -> ranks (64 steps were sometimes too few: CI)
    spec.write_text("name: chain\nbase:\n  model: {name: resnet8}\n"
                    "  data: {name: digits, subset: 2048, test_subset: 64}\n"
                    "  train: {epochs: 2, batch_size: 8, divergence_check_every: 2}\n"
                    "  tracking: {wandb: {mode: disabled}}\n")
    monkeypatch.setenv("ABEXP_NPROC", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (run,) = load_spec(spec).expand()
    folder = runs_dir(tmp_path / "r") / run.run_id

    def signal_after_epoch_1():
        deadline = time.time() + 300
        while time.time() < deadline:
            if (folder / "metrics.jsonl").exists() and (folder / "metrics.jsonl").read_text():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    threading.Thread(target=signal_after_epoch_1, daemon=True).start()
    assert worker_loop(str(spec), str(tmp_path / "r"), "one") == {"preempted": 1}
    state = io.load_torch(folder / "checkpoint.pt")
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < 256 and not (folder / RESULT).exists()
    preempt.reset()
    assert worker_loop(str(spec), str(tmp_path / "r"), "two") == {"completed": 1}
    assert json.loads((folder / RESULT).read_text())["epochs_completed"] == 2
