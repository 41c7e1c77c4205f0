"""Claims, worker slots and W&B mode resolution: the small pieces the runner relies on."""

import json
import os
import subprocess
import sys
import time

import pytest

from abexp.lab.claims import LOCK, is_stale, try_claim
from abexp.lab.local import gpu_slots
from abexp.train.tracking import resolve_mode


def fake_lock(run_dir, host, pid, age_s):
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    lock.write_text(json.dumps({"host": host, "pid": pid, "token": "x", "started": 0}))
    past = time.time() - age_s
    os.utime(lock, (past, past))
    return lock


def test_one_claim_wins_and_release_frees_the_run(tmp_path):
    first = try_claim(tmp_path / "r")
    assert first is not None and first.held()
    assert try_claim(tmp_path / "r") is None  # a live holder (this process) keeps it
    first.release()
    assert not (tmp_path / "r" / LOCK).exists() and try_claim(tmp_path / "r") is not None


def test_dead_pid_on_this_host_is_stale_at_once(tmp_path):
    import socket
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock = fake_lock(tmp_path / "r", socket.gethostname(), proc.pid, age_s=0)
    assert is_stale(lock)
    claim = try_claim(tmp_path / "r")
    assert claim is not None and claim.held()


def test_other_host_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    fresh = fake_lock(tmp_path / "a", "elsewhere", 1, age_s=5)
    old = fake_lock(tmp_path / "b", "elsewhere", 1, age_s=500)
    assert not is_stale(fresh, stale_after=120) and is_stale(old, stale_after=120)
    assert try_claim(tmp_path / "a") is None
    assert try_claim(tmp_path / "b") is not None


def test_worker_slots_for_gpus(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_slots(None, ["0", "1"], 2) == ["0", "0", "1", "1"]
    assert gpu_slots(3, ["0", "1"], 2) == ["0", "0", "1"]
    assert gpu_slots(None, ["0", "1", "2", "3"], 1, gpus_per_run=2) == ["0,1", "2,3"]
    assert gpu_slots(2, [], 1) == [None, None]


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment overrides the config
    assert resolve_mode("online") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError):
        resolve_mode("auto")
