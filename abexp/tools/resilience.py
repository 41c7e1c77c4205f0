"""``make resilience``: kill, freeze and mis-clock the runners, then audit the result.

A 16-run digits spec is run once without interruption (reference), then under three faults,
each in a results folder of its own:

- *kill*: the runner SIGKILLed ``--kills`` times at random moments and restarted each time;
- *freeze*: a runner on host ``alpha`` frozen (SIGSTOP, runner and workers) at a random moment
  for longer than the stale limit, while a runner on host ``beta`` takes its runs over and
  finishes the spec; then thawed (SIGCONT) and left to finish;
- *skewed clocks*: two runners at once on hosts whose clocks are 10 minutes ahead and 10
  minutes behind (faketime; the filesystem keeps the true time, as an NFS server does).

Hosts are UTS namespaces (``unshare --uts``, root only); without them the freeze and clock
faults are skipped and say so. Reported per fault: runs completed, duplicates (a run that
finished twice), runs trained by two holders at once (a repeated epoch in metrics.jsonl), lost
runs, runs resumed from a checkpoint, runs restarted from scratch (killed before their first
checkpoint: by design, progress since the last checkpoint is redone), and how many runs end
with weights and metrics bitwise-equal to the uninterrupted reference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SPEC = """
name: resilience
description: 16 short runs for the SIGKILL audit
base:
  model: {name: resnet8}
  data: {name: digits, subset: 384, test_subset: 128}
  train: {epochs: 6, batch_size: 32}
  optim: {lr: 0.05}
  schedule: {name: constant}
variants:
  sgdm: {optim.name: sgdm}
  ab: {optim.name: ab}
grid:
  delay.steps: [0, 4]
  seed: [0, 1, 2, 3]
"""


STALE_AFTER_S = 3.0  # the freeze and clock faults: a short stale limit, a fast heartbeat
FAULT_ENV = {"ABEXP_STALE_AFTER_S": str(STALE_AFTER_S), "ABEXP_HEARTBEAT_S": "0.3"}


def _run(spec: Path, results: Path, workers: int, host: str | None = None, clock: str | None = None,
         **env_extra: str) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", ABEXP_POLL_S="0.5", **env_extra)
    cmd = [sys.executable, "-m", "abexp.cli", "run", str(spec), "--results", str(results),
           "--workers", str(workers), "--no-progress"]
    if clock is not None:  # the process's clock shifted; file times stay the kernel's
        cmd = ["faketime", "-f", clock] + cmd
        env.update(FAKE_UTIME="1", NO_FAKE_STAT="1")
    if host is not None:
        cmd = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh"] + cmd
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def hosts_available() -> bool:
    import shutil
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def audit(spec: Path, results: Path, reference: Path) -> dict:
    from abexp.io import load_torch, read_jsonl
    from abexp.lab.spec import load_spec
    from abexp.train.folder import RunFolder

    plan = load_spec(spec).expand(warn=lambda m: None)
    completed = duplicates = lost = equal = restarted = resumed = twice = 0
    for run in plan:
        d, ref = RunFolder.of(results, run.run_id), RunFolder.of(reference, run.run_id)
        if not d.finished():
            lost += 1
            continue
        completed += 1
        events = read_jsonl(d.events)
        starts = [e for e in events if e["event"] == "start"]
        ends = sum(e["event"] == "end" for e in events)
        duplicates += ends > 1
        logged = [r["epoch"] for r in read_jsonl(d.metrics)]
        twice += len(logged) != len(set(logged))
        restarted += sum(e["from_epoch"] == 0 for e in starts) > 1
        resumed += any(e["from_epoch"] > 0 for e in starts)
        strip = lambda p: [{k: v for k, v in r.items() if k not in ("wall_s", "elapsed_s")}
                           for r in read_jsonl(p)]
        a, b = load_torch(d.weights), load_torch(ref.weights)
        same = all(torch.equal(a[k], b[k]) for k in a) and strip(d.metrics) == strip(ref.metrics)
        equal += same
    return {"runs": len(plan), "completed": completed, "duplicates": duplicates,
            "epochs_trained_twice": twice, "lost": lost,
            "resumed_from_checkpoint": resumed, "restarted_before_first_checkpoint": restarted,
            "bitwise_equal_to_uninterrupted": equal}


def kill_fault(spec: Path, tmp: Path, workers: int, kills: int, clean_s: float, rng: random.Random) -> dict:
    kill_times = []
    for _ in range(kills):
        proc = _run(spec, tmp / "killed", workers)
        wait = rng.uniform(0.2, 0.6) * clean_s
        time.sleep(wait)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_times.append(round(wait, 1))
    rc = _run(spec, tmp / "killed", workers).wait()
    return {"kills_after_s": kill_times, "final_exit_code": rc, **audit(spec, tmp / "killed", tmp / "reference")}


def freeze_fault(spec: Path, tmp: Path, workers: int, clean_s: float, rng: random.Random) -> dict:
    results = tmp / "frozen"
    frozen = _run(spec, results, workers, host="alpha", **FAULT_ENV)
    at = rng.uniform(0.2, 0.5) * clean_s
    time.sleep(at)
    os.killpg(frozen.pid, signal.SIGSTOP)
    start = time.time()
    rc_beta = _run(spec, results, workers, host="beta", **FAULT_ENV).wait()
    frozen_s = max(time.time() - start, STALE_AFTER_S + 1)
    time.sleep(max(0.0, frozen_s - (time.time() - start)))
    os.killpg(frozen.pid, signal.SIGCONT)
    rc_alpha = frozen.wait()
    return {"frozen_after_s": round(at, 1), "frozen_for_s": round(frozen_s, 1), "stale_after_s": STALE_AFTER_S,
            "exit_codes": {"alpha": rc_alpha, "beta": rc_beta}, **audit(spec, results, tmp / "reference")}


def clock_fault(spec: Path, tmp: Path, workers: int) -> dict:
    results = tmp / "skewed"
    procs = [_run(spec, results, workers, host=host, clock=clock, **FAULT_ENV)
             for host, clock in (("ahead", "+10m"), ("behind", "-10m"))]
    codes = [p.wait() for p in procs]
    return {"clocks": ["+10m", "-10m"], "exit_codes": codes, **audit(spec, results, tmp / "reference")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abexp.tools.resilience")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default="kill,freeze,clock",
                        help="comma-separated subset of kill, freeze, clock")
    parser.add_argument("--out", default="results/bench/resilience.json")
    args = parser.parse_args(argv)
    faults = set(args.faults.split(","))
    if not faults <= {"kill", "freeze", "clock"}:
        parser.error(f"--faults: unknown {sorted(faults - {'kill', 'freeze', 'clock'})}")
    import shutil

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "resilience.yaml"
        spec.write_text(SPEC)
        start = time.time()
        _run(spec, tmp / "reference", args.workers).wait()
        clean_s = time.time() - start
        report: dict = {"uninterrupted_s": round(clean_s, 1)}
        if "kill" in faults:
            report["kill"] = kill_fault(spec, tmp, args.workers, args.kills, clean_s, rng)
        no_hosts = "skipped: several hosts need root and unshare --uts"
        if "freeze" in faults:
            report["freeze"] = freeze_fault(spec, tmp, args.workers, clean_s, rng) if hosts_available() else no_hosts
        if "clock" in faults:
            report["skewed_clocks"] = (no_hosts if not hosts_available()
                                       else "skipped: Debian's faketime is not installed" if not shutil.which("faketime")
                                       else clock_fault(spec, tmp, args.workers))
    from abexp import io
    io.write_json(args.out, report)
    print(json.dumps(report, indent=1))
    audits = [r for r in report.values() if isinstance(r, dict)]
    ok = all(r["completed"] == r["runs"] and not r["duplicates"] and not r["lost"] and not r["epochs_trained_twice"]
             for r in audits)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
