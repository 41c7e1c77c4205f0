"""``make resilience``: kill the runner with SIGKILL at random moments, restart, audit the result.

A 16-run digits spec is run once without interruption (reference) and once with the runner
SIGKILLed ``--kills`` times at random moments and restarted each time. Reported: runs
completed, duplicates (a run that finished twice), lost runs,
runs resumed from a checkpoint, runs restarted from scratch (killed before their first
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


def _run(spec: Path, results: Path, workers: int) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", ABEXP_POLL_S="0.5")
    return subprocess.Popen([sys.executable, "-m", "abexp.cli", "run", str(spec), "--results",
                             str(results), "--workers", str(workers), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def audit(spec: Path, results: Path, reference: Path) -> dict:
    from abexp.io import load_torch, read_jsonl
    from abexp.spec import load_spec

    plan = load_spec(spec).expand(warn=lambda m: None)
    completed = duplicates = lost = equal = restarted = resumed = 0
    for run in plan:
        d, ref = results / "runs" / run.run_id, reference / "runs" / run.run_id
        if not (d / "result.json").exists():
            lost += 1
            continue
        completed += 1
        events = read_jsonl(d / "events.jsonl")
        starts = [e for e in events if e["event"] == "start"]
        ends = sum(e["event"] == "end" for e in events)
        duplicates += ends > 1
        restarted += sum(e["from_epoch"] == 0 for e in starts) > 1
        resumed += any(e["from_epoch"] > 0 for e in starts)
        strip = lambda p: [{k: v for k, v in r.items() if k not in ("wall_s", "elapsed_s")}
                           for r in read_jsonl(p)]
        a, b = load_torch(d / "model.pt"), load_torch(ref / "model.pt")
        same = all(torch.equal(a[k], b[k]) for k in a) and strip(d / "metrics.jsonl") == strip(ref / "metrics.jsonl")
        equal += same
    return {"runs": len(plan), "completed": completed, "duplicates": duplicates, "lost": lost,
            "resumed_from_checkpoint": resumed, "restarted_before_first_checkpoint": restarted,
            "bitwise_equal_to_uninterrupted": equal}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abexp.resilience")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench/resilience.json")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "resilience.yaml"
        spec.write_text(SPEC)
        start = time.time()
        _run(spec, tmp / "reference", args.workers).wait()
        clean_s = time.time() - start
        kill_times = []
        for _ in range(args.kills):
            proc = _run(spec, tmp / "killed", args.workers)
            wait = rng.uniform(0.2, 0.6) * clean_s
            time.sleep(wait)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kill_times.append(round(wait, 1))
        final = _run(spec, tmp / "killed", args.workers)
        rc = final.wait()
        report = {"kills_after_s": kill_times, "uninterrupted_s": round(clean_s, 1),
                  "final_exit_code": rc, **audit(spec, tmp / "killed", tmp / "reference")}
    from abexp import io
    io.write_json(args.out, report)
    print(json.dumps(report, indent=1))
    ok = report["completed"] == report["runs"] and not report["duplicates"] and not report["lost"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
