"""Run every run of a spec, each exactly once, resumably, with N worker processes.

Workers (``python -m abexp.lab.runner ...``, locally or as SLURM array tasks: abexp.lab.slurm) all run
``worker_loop``: walk the plan, claim a run (abexp.lab.claims), train it in-process (resuming its
checkpoint if any), release it. A run that raises is recorded in ``failed.json`` with its
traceback and is not retried within the same session; the next ``abexp run`` retries it.
A local worker dies with its runner (PR_SET_PDEATHSIG), so a killed runner leaves no orphan
training a run that a restarted runner would then train twice.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Iterable

from abexp.train.preempt import die_with_parent
from abexp import io
from abexp.train import preempt
from abexp.config import ConfigError, RunConfig, dump_yaml
from abexp.lab.claims import Claim, ClaimLost, Heartbeat, is_stale, try_claim
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
    plan = load_spec(spec_path, overrides).expand(warn=lambda msg: None)
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


def supervise(commands: list[tuple[list[str], dict]], total: int, count: Callable[[], int],
              unit: str, desc: str, progress: bool, postfix: Callable[[], str] | None = None) -> list[int]:
    """Start worker processes (each dies with this one), show ``count()`` of ``total`` (and
    ``postfix()``) until they have all exited, and return their exit codes."""
    from tqdm import tqdm

    procs = [subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent) for cmd, env in commands]
    bar = tqdm(total=total, initial=min(total, count()), unit=unit, desc=desc, disable=not progress,
               dynamic_ncols=True)

    def refresh() -> None:
        if postfix is not None and progress:
            bar.set_postfix_str(postfix(), refresh=False)
        bar.update(min(total, count()) - bar.n)

    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            refresh()
        refresh()
    finally:
        bar.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.wait() for p in procs]


def visible_gpus() -> list[str]:
    """The GPUs this process was given, as CUDA_VISIBLE_DEVICES names them (indices, UUIDs,
    MIG names: a node restricted to "2,3", SLURM without device cgroups), else 0..n-1; none
    when this torch sees no GPU. Children get these names, never renumbered ones."""
    try:
        import torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return []
    if count == 0:
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    names = []
    for name in (n.strip() for n in listed.split(",")):
        if not name or name.startswith("-"):  # CUDA stops at the first invalid entry
            break
        names.append(name)
    return names[:count]


def _slots(workers: int | None, gpus: list[str] | None, runs_per_gpu: int,
           gpus_per_run: int = 1) -> list[str | None]:
    """One entry per worker: the GPUs it sees (its CUDA_VISIBLE_DEVICES) or None for CPU.
    ``gpus`` (``--gpus``) are indices as torch numbers the visible GPUs in this process."""
    visible = visible_gpus()
    if gpus is not None and visible:
        bad = [g for g in gpus if not g.isdigit() or int(g) >= len(visible)]
        if bad:
            raise ConfigError("--gpus", "", f"{bad[0]!r}: this process sees {len(visible)} GPU(s), "
                                            f"numbered 0..{len(visible) - 1}")
        visible = [visible[int(g)] for g in gpus]
    if visible:
        if gpus_per_run > len(visible):
            raise ConfigError("--gpus-per-run", "", f"{gpus_per_run} GPUs per run, but only {len(visible)} "
                                                    f"visible ({','.join(visible)})")
        groups = [",".join(visible[i:i + gpus_per_run])
                  for i in range(0, len(visible) - gpus_per_run + 1, gpus_per_run)]
        slots: list[str | None] = [g for g in groups for _ in range(runs_per_gpu)]
        return slots[:workers] if workers else slots
    return [None] * (workers or 1)


def worker_env(gpu: str | None, threads: int, **extra: str) -> dict[str, str]:
    """A worker's environment: its GPUs (and one process per GPU of a run), its CPU threads."""
    env = dict(os.environ, ABEXP_THREADS=str(threads), **extra)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        env["ABEXP_NPROC"] = str(len(gpu.split(",")))
    return env


def thread_share(slots: list[str | None]) -> int:
    """CPU threads per worker: the cores shared out on a CPU, 4 beside a GPU; ABEXP_THREADS
    fixes it (make demo: the numbers then do not depend on the core count)."""
    threads = max(1, (os.cpu_count() or 1) // len(slots)) if slots[0] is None else 4
    return int(os.environ.get("ABEXP_THREADS") or threads)


def async_sharing_note(plan: list[PlannedRun], workers: int, cores: int) -> str | None:
    """An async run is N + 1 processes (a server and N workers), not the one process the core
    share assumes: when several workers may run async runs side by side beyond the cores, say so,
    since each run's staleness then also depends on the runs beside it (the OS scheduler's)."""
    sizes = sorted(r.config.delay.workers + 1 for r in plan if r.config.delay.kind == "async")
    side_by_side = sum(sizes[-workers:]) if sizes and workers > 1 else 0
    if side_by_side <= cores:
        return None
    return (f"note: {len(sizes)} async run(s) of up to {sizes[-1]} processes each; {workers} workers may run "
            f"{side_by_side} of their processes at once on {cores} cores, and each run's staleness then depends on "
            f"the runs beside it: --workers 1 runs them one at a time (docs/async.md)")


def summarize(states: list[str]) -> str:
    """``3 completed, 1 diverged, 20 pending (24 runs)``, in STATES order."""
    counts = [f"{states.count(s)} {s}" for s in STATES if states.count(s)]
    return ", ".join(counts) + f" ({len(states)} runs)"


def run_local(spec_path: str, results: str, workers: int | None = None,
              gpus: list[str] | None = None, runs_per_gpu: int = 1, progress: bool = True,
              overrides: list[str] | None = None, gpus_per_run: int = 1, pack: int = 1) -> int:
    """Start the workers, show progress, return 0 when every run ended done (or diverged)."""
    plan = load_spec(spec_path, overrides).expand(warn=lambda msg: None)
    ids = [r.run_id for r in plan]
    root = runs_dir(results)
    session = uuid.uuid4().hex[:12]
    done = lambda: sum(RunFolder(root / rid).finished() for rid in ids)  # noqa: E731
    if done() == len(ids):
        print(f"all {len(ids)} runs of {spec_path} are done")
        return 0
    slots = _slots(workers, gpus, runs_per_gpu, gpus_per_run)
    threads = thread_share(slots)
    note = async_sharing_note([r for r in plan if not RunFolder(root / r.run_id).finished()],
                              len(slots), os.cpu_count() or 1)
    if note:
        print(note, flush=True)
    commands = [([sys.executable, "-m", "abexp.lab.runner", spec_path, results, session, *(overrides or [])],
                 worker_env(gpu, threads, ABEXP_PACK=str(pack))) for gpu in slots]
    # progress in epochs (with their rate), not whole runs: the first run's minutes show too
    epochs = {r.run_id: r.config.train.epochs for r in plan}

    def epochs_done() -> int:
        n = 0
        for rid, total in epochs.items():
            if RunFolder(root / rid).finished():
                n += total
            else:
                try:
                    n += RunFolder(root / rid).metrics.read_bytes().count(b"\n")
                except OSError:
                    pass
        return n

    from abexp.lab.length import steps_per_run
    steps = sorted({steps_per_run(r.config) for r in plan})
    per_run = f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}-{steps[-1]:,}"
    codes = supervise(commands, sum(epochs.values()), epochs_done, "epoch", Path(spec_path).stem, progress,
                      postfix=lambda: f"{done()}/{len(ids)} runs done, {per_run} steps per run")
    failed = [rid for rid in ids if _failed_in_session(root / rid, session)]
    crashed = [code for code in codes if code != 0]
    for rid in failed:
        print(f"failed: {rid} (traceback in {RunFolder(root / rid).log})", file=sys.stderr)
    if crashed:
        print(f"{len(crashed)} worker(s) exited abnormally: {crashed}", file=sys.stderr)
    return 1 if failed or crashed or done() < len(ids) else 0


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
