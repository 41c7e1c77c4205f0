"""The grid runner: exactly once under SIGKILL and concurrency, failures isolated, W&B, SLURM."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from abexp.lab.runner import runs_dir
from abexp.lab.spec import load_spec

ENV = dict(os.environ, WANDB_MODE="disabled", ABEXP_POLL_S="0.3", ABEXP_HEARTBEAT_S="1")


def write_spec(path: Path, epochs=2, seeds=(0, 1), extra_variants="") -> Path:
    path.write_text(textwrap.dedent("""
        name: {name}
        base:
          model: {{name: resnet8}}
          data: {{name: digits, subset: 192, test_subset: 64}}
          train: {{epochs: {epochs}, batch_size: 32}}
          optim: {{lr: 0.05}}
          schedule: {{name: constant}}
        variants:
          sgdm: {{optim.name: sgdm}}
          ab: {{optim.name: ab}}{extra}
        grid:
          seed: {seeds}
    """).format(name=path.stem, epochs=epochs, extra=extra_variants, seeds=list(seeds)))
    return path


def abexp_run(spec, results, *extra, wait=True):
    cmd = [sys.executable, "-m", "abexp.cli", "run", str(spec), "--results", str(results),
           "--no-progress", *extra]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    return proc


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def assert_each_run_once(spec, results, epochs):
    for run in load_spec(spec).expand():
        run_dir = runs_dir(results) / run.run_id
        ev = events(run_dir)
        ends = [e for e in ev if e["event"] == "end"]
        fresh_starts = [e for e in ev if e["event"] == "start" and e.get("from_step", e["from_epoch"]) == 0]
        assert len(ends) == 1, (run.run_id, ev)
        assert len(fresh_starts) == 1, (run.run_id, ev)  # never trained from scratch twice
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
        assert json.loads((run_dir / "result.json").read_text())["epochs_completed"] == epochs


def test_sigkill_mid_run_then_restart_completes_every_run_once(tmp_path):
    spec = write_spec(tmp_path / "kill.yaml", epochs=4, seeds=(0,))
    results = tmp_path / "results"
    proc = abexp_run(spec, results, "--workers", "1", wait=False)
    deadline = time.time() + 120
    while not list(runs_dir(results).glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(runs_dir(results).glob("*/checkpoint.pt")), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)  # the runner alone: its worker must die with it
    proc.wait()
    time.sleep(0.5)
    interrupted = [p.parent for p in runs_dir(results).glob("*/checkpoint.pt")]
    assert interrupted and not any((d / "result.json").exists() for d in interrupted)
    rc, out, err = abexp_run(spec, results, "--workers", "1")
    assert rc == 0, err
    assert_each_run_once(spec, results, epochs=4)
    resumed = [e for d in interrupted for e in events(d) if e["event"] == "start" and e["from_epoch"] > 0]
    assert resumed, "the interrupted run did not resume from its checkpoint"


def test_two_concurrent_runners_never_train_a_run_twice(tmp_path):
    spec = write_spec(tmp_path / "conc.yaml", epochs=1, seeds=(0, 1, 2))
    results = tmp_path / "results"
    a = abexp_run(spec, results, "--workers", "1", wait=False)
    b = abexp_run(spec, results, "--workers", "1", wait=False)
    assert a.wait(timeout=300) == 0 and b.wait(timeout=300) == 0
    assert_each_run_once(spec, results, epochs=1)
    pids = {e["pid"] for run in load_spec(spec).expand()
            for e in events(runs_dir(results) / run.run_id)}
    assert len(pids) == 2  # both runners did share the work


def test_diverging_and_crashing_runs_do_not_stop_the_others(tmp_path):
    extra = ("\n  diverge: {optim.name: sgdm, optim.lr: 1.0e+6, train.divergence_check_every: 1}"
             # fewer examples than one batch: Batches raises inside the worker
             "\n  crash: {optim.name: sgdm, data.subset: 4}")
    spec = write_spec(tmp_path / "mixed.yaml", epochs=1, seeds=(0,), extra_variants=extra)
    results = tmp_path / "results"
    rc, out, err = abexp_run(spec, results, "--workers", "2")
    assert rc == 1 and "failed" in err
    by_variant = {r.overrides["variant"]: runs_dir(results) / r.run_id for r in load_spec(spec).expand()}
    status = lambda d: json.loads((d / "result.json").read_text())["status"]
    assert status(by_variant["sgdm"]) == "completed" and status(by_variant["ab"]) == "completed"
    assert status(by_variant["diverge"]) == "diverged"
    crash = by_variant["crash"]
    assert not (crash / "result.json").exists()
    failed = json.loads((crash / "failed.json").read_text())
    assert failed["status"] == "failed" and "DataError" in failed["traceback"]
    assert "Traceback" in (crash / "log.txt").read_text()
    # collect reports all four, with their states
    from abexp.lab.collect import collect
    table = collect(results).set_index("variant")
    assert table.loc["crash", "status"] == "failed" and table.loc["diverge", "status"] == "diverged"


def test_wandb_offline_folders_are_named_by_run_id(tmp_path, monkeypatch):
    from abexp.config import load_config, run_id
    from abexp.train.start import train_run
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = load_config(None, ["data.name=digits", "model.name=resnet8", "data.subset=64",
                             "data.test_subset=32", "train.batch_size=32", "train.epochs=1",
                             "tracking.wandb.mode=offline", "experiment=wb"])
    out = tmp_path / "run"
    train_run(cfg, out, device="cpu", log=lambda s: None)
    folders = list((out / "wandb").glob("offline-run-*"))
    assert folders and all(f.name.endswith(run_id(cfg)) for f in folders)


def test_run_with_pack_trains_compatible_runs_together(tmp_path):
    spec = write_spec(tmp_path / "pack.yaml", epochs=1, seeds=(0, 1))
    results = tmp_path / "results"
    rc, out, err = abexp_run(spec, results, "--workers", "1", "--pack", "4")
    assert rc == 0, err
    assert_each_run_once(spec, results, epochs=1)
    packed = [e.get("packed") for run in load_spec(spec).expand()
              for e in events(runs_dir(results) / run.run_id) if e["event"] == "start"]
    assert packed == [4, 4, 4, 4]


def test_async_runs_side_by_side_beyond_the_cores_are_said(tmp_path):
    """An async run is N + 1 processes: two workers may run the two largest async runs at once
    (N = 3 and 1: 4 + 2 = 6 processes); counted by hand against the cores."""
    from abexp.lab.local import async_sharing_note
    from abexp.lab.spec import load_spec

    spec = tmp_path / "a.yaml"
    spec.write_text(textwrap.dedent("""\
        name: a
        base: {model: {name: resnet8}, data: {name: digits, subset: 64}, train: {epochs: 1}, eval: {bn: recalibrate}}
        variants:
          real: {delay.kind: async, grid: {delay.workers: [1, 3]}}
          simulated: {delay.kind: constant, grid: {delay.steps: [0, 2]}}
        """))
    plan = load_spec(spec).expand(warn=lambda m: None)
    note = async_sharing_note(plan, workers=2, cores=2)
    assert note is not None and "2 async run(s) of up to 4 processes" in note and "6 of their processes" in note
    assert async_sharing_note(plan, workers=2, cores=6) is None  # 6 processes fit 6 cores
    assert async_sharing_note(plan, workers=1, cores=2) is None  # one run at a time: nothing beside it
    simulated = [r for r in plan if r.config.delay.kind != "async"]
    assert async_sharing_note(simulated, workers=8, cores=1) is None
