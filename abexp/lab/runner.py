"""The worker: every run of a spec, each exactly once, resumably, whoever started the worker.

Workers (``python -m abexp.lab.runner ...``, started by a launch backend: abexp.lab.local on
this machine, abexp.lab.slurm as array tasks) all run ``worker_loop``: walk the plan, claim a
run (abexp.lab.claims), train it in-process (resuming its checkpoint if any), release it. A run
that raises is recorded in ``failed.json`` with its traceback and is not retried within the
same session; the next ``abexp run`` retries it. ``run_state`` names a run folder's state.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Iterable

from abexp import io
from abexp.train import preempt
from abexp.config import RunConfig, dump_yaml
from abexp.lab.claims import Claim, ClaimLost, Heartbeat, is_stale, try_claim
from abexp.lab.elsewhere import to_run_here
from abexp.lab.spec import PlannedRun, load_spec
from abexp.process_env import init_process_env
from abexp.train.folder import STATES, RunFolder, runs_dir  # noqa: F401 -- runs_dir, STATES: the lab's names

FAILED, EVENTS, LOG = RunFolder.FAILED, RunFolder.EVENTS, RunFolder.LOG
POLL_S = float(os.environ.get("ABEXP_POLL_S", "2"))


def run_state(run_dir: Path) -> str:
    """One of STATES, from the files in the run folder alone (abexp.train.folder), a claim
    counting as running while its holder is alive (abexp.lab.claims)."""
    return RunFolder(run_dir).state(claim_live=lambda lock: not is_stale(lock))


def _failed_in_session(run_dir: Path, session: str) -> bool:
    return RunFolder(run_dir).failed_in(session)


def _worker_log(run_dirs: list[Path], claims: list[Claim]):
    """A log function writing to each run's log.txt while its claim is held (fenced like
    every other write); the handles, to close."""
    handles = [open(RunFolder(d).log, "a", buffering=1) for d in run_dirs]

    def log(msg: str) -> None:
        for fh, claim in zip(handles, claims):
            claim.check()
            fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
    return log, handles


def _record_failure(run_dirs: list[Path], handles, claims: list[Claim], session: str, err: Exception) -> bool:
    """The traceback into log.txt and failed.json of each run whose claim is still held; False
    when a claim was lost (the crash may be the loss's doing: a holder frozen past the stale
    limit finds, say, its Optuna journal lock broken; the run is no longer its to mark)."""
    tb = traceback.format_exc()
    all_held = True
    for d, fh, claim in zip(run_dirs, handles, claims):
        if not claim.held():
            all_held = False
            continue
        fh.write(tb)
        io.write_json(RunFolder(d).failed, {"status": "failed", "session": session, "error": repr(err),
                                   "traceback": tb, "host": socket.gethostname(), "time": time.time()})
    return all_held


def _say_lost(lost: ClaimLost) -> None:
    """A lost claim is said on this worker's stderr: the run folder is no longer ours."""
    print(f"worker {socket.gethostname()}:{os.getpid()}: {lost}", file=sys.stderr, flush=True)


def train_claimed(config: RunConfig, run_dir: Path, session: str, claim: Claim, on_epoch=None) -> str:
    """Train a run this process has claimed; a crash becomes failed.json, never an exception.
    Every write into the run folder is fenced by ``claim``: on finding it lost the run stops
    at once, nothing more is written there, and the status is ``lost``."""
    from abexp.train.start import train_run

    nproc = int(os.environ.get("ABEXP_NPROC", "1"))
    folder = RunFolder(run_dir)
    with io.fenced(run_dir, claim.check):
        try:
            if not folder.config.exists():  # so status and collect see even a failed run
                io.write_text(folder.config, dump_yaml(config))
            log, (log_fh,) = _worker_log([run_dir], [claim])
        except ClaimLost as lost:
            _say_lost(lost)
            return "lost"
        try:
            if nproc > 1:  # a multi-GPU run: torchrun in a child that dies with this worker
                cmd = [sys.executable, "-m", "abexp.cli", "train", str(folder.config),
                       "--out", str(run_dir), "--nproc", str(nproc)]
                # SLURM signals this worker alone: the stop is passed on to the ranks (preempt)
                code = preempt.run_forwarding(cmd, stdout=log_fh, stderr=subprocess.STDOUT,
                                              env=dict(os.environ, **claim.env()))
                claim.check()
                if preempt.requested() is not None and not folder.finished():
                    # stopped by the signal (scancel's SIGTERM also reaches torchrun, which then
                    # exits non-zero): resumable from the ranks' checkpoint, whatever the code
                    raise preempt.Preempted(f"the ranks' checkpoint (torchrun exit code {code})")
                if code != 0:
                    raise RuntimeError(f"torchrun exited with {code}")
                return folder.read_result()["status"]
            result = train_run(config, run_dir, device="auto", log=log, on_epoch=on_epoch)
            io.remove(folder.failed)
            return result["status"]
        except ClaimLost as lost:
            _say_lost(lost)
            return "lost"
        except preempt.Preempted as stop:  # checkpoint saved; whoever claims the run next resumes it
            log(f"signal {preempt.requested()}: stopped at {stop}, checkpoint saved")
            return "preempted"
        except Exception as err:  # a crashed run must not stop the others
            try:
                if not _record_failure([run_dir], [log_fh], [claim], session, err):
                    claim.check()  # raises: said below, nothing written
            except ClaimLost as lost:
                _say_lost(lost)
                return "lost"
            return "failed"
        finally:
            log_fh.close()


def train_pack_claimed(runs: list[PlannedRun], run_dirs: list[Path], session: str,
                       claims: list[Claim]) -> list[str]:
    """Train claimed runs together (abexp.train.packed); a crash fails every run of the pack, and a
    claim lost on any of them stops the pack (the others resume alone from their checkpoints)."""
    from abexp.train.packed import train_pack

    with contextlib.ExitStack() as stack:
        for d, c in zip(run_dirs, claims):
            stack.enter_context(io.fenced(d, c.check))
        try:
            for r, d in zip(runs, run_dirs):  # so status and collect see even a failed run
                if not RunFolder(d).config.exists():
                    io.write_text(RunFolder(d).config, dump_yaml(r.config))
            log, logs = _worker_log(run_dirs, claims)
        except ClaimLost as lost:
            _say_lost(lost)
            return ["lost" if not c.held() else "stopped" for c in claims]
        stack.callback(lambda: [fh.close() for fh in logs])
        try:
            results = train_pack([r.config for r in runs], run_dirs, device="auto", log=log)
            return [r["status"] for r in results]
        except ClaimLost as lost:
            _say_lost(lost)
            return ["lost" if not c.held() else "stopped" for c in claims]
        except Exception as err:
            try:
                _record_failure(run_dirs, logs, claims, session, err)
            except ClaimLost as lost:
                _say_lost(lost)
            return ["failed" if c.held() else "lost" for c in claims]


def _pack_partners(run: PlannedRun, plan: list[PlannedRun], root: Path, session: str, size: int):
    """Claim up to size-1 fresh runs that can share a pack with ``run``."""
    from abexp.train.packed import pack_key

    key = pack_key(run.config)
    if size <= 1 or key is None or RunFolder(root / run.run_id).started():
        return []
    partners = []
    for other in plan:
        if len(partners) == size - 1:
            break
        d = root / other.run_id
        if (other.run_id == run.run_id or RunFolder(d).finished() or RunFolder(d).started()
                or _failed_in_session(d, session) or pack_key(other.config) != key):
            continue
        claim = try_claim(d)
        if claim is not None:
            partners.append((other, claim))
    return partners


def worker_loop(spec_path: str, results: str, session: str, overrides: list[str] | None = None,
                poll_s: float = POLL_S, pack: int = 1) -> dict:
    """Claim and train pending runs until every run is done or failed in this session.

    With ``pack`` > 1, up to that many fresh compatible runs are trained together in one
    process (abexp.train.packed); runs resuming from a checkpoint are trained alone.
    """
    pack = int(os.environ.get("ABEXP_PACK", pack))
    apply_thread_budget()
    plan = to_run_here(load_spec(spec_path, overrides).expand(warn=lambda msg: None))
    root = runs_dir(results)
    heartbeat = Heartbeat()
    counts: dict[str, int] = {}
    try:
        while True:
            unfinished = 0
            for run in plan:
                run_dir = root / run.run_id
                if RunFolder(run_dir).finished() or _failed_in_session(run_dir, session):
                    continue
                unfinished += 1
                if preempt.requested():  # told to stop: claim nothing more
                    return counts
                claim = try_claim(run_dir)
                if claim is None:
                    continue
                group = [(run, claim)] + _pack_partners(run, plan, root, session, pack)
                for _, c in group:
                    heartbeat.add(c)
                try:
                    group_todo = [(r, root / r.run_id) for r, _ in group
                                  if not RunFolder(root / r.run_id).finished()]
                    held = {r.run_id: c for r, c in group}
                    if len(group_todo) == 1:
                        r, d = group_todo[0]
                        statuses = [train_claimed(r.config, d, session, held[r.run_id])]
                    elif group_todo:
                        statuses = train_pack_claimed([r for r, _ in group_todo], [d for _, d in group_todo],
                                                      session, [held[r.run_id] for r, _ in group_todo])
                    else:
                        statuses = []
                    for status in statuses:
                        counts[status] = counts.get(status, 0) + 1
                finally:
                    for _, c in group:
                        heartbeat.remove(c)
                        c.release()
            if unfinished == 0 or preempt.requested():  # a stopped run also stops the next claim
                return counts
            time.sleep(poll_s)  # the rest are claimed by live workers: wait, they may die
    finally:
        heartbeat.stop()


def apply_thread_budget(ranks: int = 1) -> None:
    """In a worker process: use the share of the CPU threads its parent (or SLURM) gave it,
    not every core of the node; one of ``ranks`` processes of a run on this node, its share."""
    threads = os.environ.get("ABEXP_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:
        import torch
        torch.set_num_threads(max(1, int(threads) // ranks))


def summarize(states: list[str]) -> str:
    """``3 completed, 1 diverged, 20 pending (24 runs)``, in STATES order (then the runs finished
    on another machine, ``abexp status --done-rows``)."""
    counts = [f"{states.count(s)} {s}" for s in (*STATES, "elsewhere") if states.count(s)]
    return ", ".join(counts) + f" ({len(states)} runs)"


def worker_main(argv: Iterable[str]) -> int:
    """A worker process; as a SLURM task (ABEXP_SLURM_FOLDER set) it stops on SLURM's signals
    at the next step boundary and requeues itself (abexp.lab.slurm)."""
    init_process_env()  # first: cuBLAS reads it once per process (abexp.process_env)
    spec_path, results, session, *overrides = list(argv)
    under_slurm = bool(os.environ.get("ABEXP_SLURM_FOLDER"))
    if under_slurm:
        preempt.install()
    counts = worker_loop(spec_path, results, session, overrides)
    if under_slurm:  # the task's log says what it did
        print(f"worker {os.getpid()}: {counts}", flush=True)
    if under_slurm and counts.get("preempted"):
        from abexp.lab.slurm import requeue_self
        requeue_self(lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
