"""SLURM backend: an sbatch job array whose tasks are ordinary abexp workers.

``abexp run --backend slurm`` (``SlurmBackend``, a launch backend: abexp.lab.backends) writes
``<slurm folder>/<session>/task.sbatch`` (readable, plain ``#SBATCH`` lines) and submits it as
an array of ``--array`` tasks. Every task runs
``abexp.lab.runner``'s worker loop, so runs are claimed exactly once, as locally.

Resources are flags, checked before submitting against what ``sinfo`` reports for the
partition, so a request no node can satisfy is an error naming the flag, not a job pending
forever. GPUs are asked for only when the partition has them (or ``--gpus-per-task`` says so).

Pre-emption, ``scancel`` and the time-limit warning (``--signal=B:USR1@grace``) all reach the
worker as a signal (abexp.train.preempt): it checkpoints at the next step boundary, releases its
claim and submits a replacement task (``requeue_self``), so a pre-empted grid finishes by
itself. ``abexp cancel`` writes a ``stop`` marker first: cancelled tasks then checkpoint and do
not come back.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from abexp import io
from abexp.lab.backends import Launch
from abexp.lab.claims import slurm_task
from abexp.lab.elsewhere import ENV as ELSEWHERE
from abexp.config import ConfigError

SCRIPT, JOBS, STOP = "task.sbatch", "jobs.txt", "stop"


@dataclass
class Request:
    """What every array task asks SLURM for; None leaves the cluster's default."""
    array: int = 4
    cpus_per_task: int | None = None  # None: enough to feed the run's ranks (``default_cpus``)
    gpus_per_task: int | None = None  # None: one GPU per run where the partition has GPUs
    mem: str | None = None            # SLURM syntax: 4000 (MB), 16G, 500M
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None           # SLURM syntax: minutes, H:MM:SS, D-HH:MM:SS
    signal_grace_s: int = 120         # USR1 this long before the time limit
    nproc: int = 1                    # processes per run (one per GPU of a run): ABEXP_NPROC


class SlurmBackend:
    """``abexp run --backend slurm``: an sbatch job array whose tasks are workers. ``check``
    asks sinfo whether some node can run a task; ``launch`` writes the script and submits it."""

    name = "slurm"

    def __init__(self) -> None:
        self.request: Request | None = None

    def check(self, launch: Launch) -> None:
        self.request = checked_slurm_request(launch)

    def launch(self, launch: Launch) -> int:
        return submit_slurm(launch, self.request if self.request is not None else checked_slurm_request(launch))


def checked_slurm_request(launch: Launch) -> Request:
    """The array request of ``launch.options`` (the slurm flags), checked against sinfo before
    anything is printed or submitted; the CPUs by default enough for the plan's data loaders."""
    if launch.pack > 1:
        raise ConfigError("--pack", "", "local only: SLURM tasks train one run at a time")
    o = launch.options
    req = Request(array=o.get("array", 4), cpus_per_task=o.get("cpus_per_task"), gpus_per_task=o.get("gpus_per_task"),
                  mem=o.get("mem"), partition=o.get("partition"), account=o.get("account"), qos=o.get("qos"),
                  time=o.get("time"))
    return check_request(req, query_nodes(), launch.gpus_per_run, loader_workers([r.config for r in launch.plan]))


def submit_slurm(launch: Launch, req: Request) -> int:
    """Write the array script for a checked request and submit it."""
    import uuid

    folder_flag = launch.options.get("slurm_folder", "results/slurm")
    job, folder = submit(req, launch.spec_path, launch.results, uuid.uuid4().hex[:12], folder_flag, launch.overrides)
    print(f"submitted job array {job} ({req.array} tasks, {req.cpus_per_task} CPUs and "
          f"{req.gpus_per_task} GPU(s) each); script {folder / SCRIPT}")
    print(f"progress: abexp status {launch.spec_path} --results {launch.results}; stop for good: "
          f"abexp cancel --slurm-folder {folder_flag}")
    return 0


@dataclass
class Node:
    partition: str
    default: bool
    cpus: int
    mem_mb: int
    gpus: int
    time_limit_min: float  # inf when unlimited


def parse_mem_mb(text: str) -> int | None:
    """SLURM memory (default unit MB; K, M, G, T suffixes) in MB, or None if malformed."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[m.group(2).upper()]
    return int(int(m.group(1)) * scale)


def parse_time_min(text: str) -> float | None:
    """SLURM time (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S; infinite) in minutes, or None."""
    text = str(text).strip()
    if text in ("infinite", "UNLIMITED", "NOT_SET", "n/a"):
        return float("inf")
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        return None
    days, a, b, c = m.groups()
    a, b, c = int(a), b and int(b), c and int(c)
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    if c is not None:     # H:M:S
        return a * 60 + b + c / 60
    if b is not None:     # M:S
        return a + b / 60
    return float(a)       # minutes


def gres_gpus(gres: str) -> int:
    """GPUs in a GRES string such as ``gpu:4``, ``gpu:a100:8(S:0-1)`` or ``(null)``."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo(text: str) -> list[Node]:
    """Lines of ``sinfo -h -N -o '%P|%c|%m|%G|%l'``: one per node and partition."""
    nodes = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        part, cpus, mem, gres, limit = fields
        limit_min = parse_time_min(limit)
        nodes.append(Node(part.rstrip("*"), part.endswith("*"), int(cpus.rstrip("+") or 0),
                          int(mem.rstrip("+") or 0), gres_gpus(gres),
                          float("inf") if limit_min is None else limit_min))
    return nodes


def query_nodes() -> list[Node] | None:
    """What sinfo reports, or None where SLURM's client is missing or its controller is down."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G|%l"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_sinfo(out.stdout) if out.returncode == 0 else None


def loader_workers(configs) -> int:
    """The most DataLoader worker processes a run of these uses (``data.workers``: ImageNet's
    loader; the other datasets are tensors in memory and use none)."""
    return max((c.data.workers for c in configs if c.data.name == "imagenet"), default=0)


def default_cpus(workers: int, ranks: int, largest: int | None = None) -> int:
    """CPUs per task when --cpus-per-task is not given: per process of a run (one per GPU), its
    loader's workers and one for itself; at least 2 (what the flag's default was), at most the
    largest node's CPUs (a default never makes a request that no node can hold)."""
    cpus = max(2, (workers + 1) * ranks)
    return cpus if largest is None else max(1, min(cpus, largest))


def check_request(req: Request, nodes: list[Node] | None, gpus_per_run: int = 1, workers: int = 0) -> Request:
    """Fill the GPU and CPU defaults and check the request against the nodes (skipped when
    None). ``workers``: the DataLoader workers of a run's process (``loader_workers``).

    Raises ConfigError naming the flag when no node of the partition can run one task.
    """
    mem_mb = None if req.mem is None else parse_mem_mb(req.mem)
    if req.mem is not None and mem_mb is None:
        raise ConfigError("--mem", "", f"{req.mem!r}: expected a size such as 4000, 500M or 16G")
    time_min = None if req.time is None else parse_time_min(req.time)
    if req.time is not None and time_min is None:
        raise ConfigError("--time", "", f"{req.time!r}: expected minutes, H:MM:SS or D-HH:MM:SS")
    if nodes is None:
        if req.gpus_per_task is None:
            req.gpus_per_task = 0
        if req.cpus_per_task is None:
            req.cpus_per_task = default_cpus(workers, _ranks(req, gpus_per_run))
        return _processes(req, gpus_per_run)
    if req.partition is None:
        pool = [n for n in nodes if n.default] or nodes
    else:
        pool = [n for n in nodes if n.partition == req.partition]
        if not pool:
            known = sorted({n.partition for n in nodes})
            raise ConfigError("--partition", "", f"{req.partition!r} is not a partition here ({', '.join(known)})")
    where = f"partition {pool[0].partition}"
    if req.gpus_per_task is None:  # the spec's needs: GPUs where the partition has them
        req.gpus_per_task = gpus_per_run if any(n.gpus for n in pool) else 0
    if req.cpus_per_task is None:
        holders = [n for n in pool if n.gpus >= (req.gpus_per_task or 0)] or pool
        req.cpus_per_task = default_cpus(workers, _ranks(req, gpus_per_run), max(n.cpus for n in holders))
    fits = [n for n in pool if n.cpus >= req.cpus_per_task]
    if not fits:
        raise ConfigError("--cpus-per-task", "", f"{req.cpus_per_task} CPUs: no node of {where} has more "
                                                 f"than {max(n.cpus for n in pool)}")
    if mem_mb is not None:
        fits = [n for n in fits if n.mem_mb >= mem_mb]
        if not fits:
            raise ConfigError("--mem", "", f"{req.mem}: no node of {where} with {req.cpus_per_task} CPUs "
                                           f"has more than {max(n.mem_mb for n in pool)} MB")
    if req.gpus_per_task:
        fits = [n for n in fits if n.gpus >= req.gpus_per_task]
        if not fits:
            raise ConfigError("--gpus-per-task", "", f"{req.gpus_per_task} GPU(s): no node of {where} has "
                                                     f"{'any GPU' if not any(n.gpus for n in pool) else 'that many'}"
                                                     " (0 runs on CPU)")
    if time_min is not None and time_min > max(n.time_limit_min for n in fits):
        raise ConfigError("--time", "", f"{req.time}: over the time limit of {where}")
    return _processes(req, gpus_per_run)


def _ranks(req: Request, gpus_per_run: int) -> int:
    """Processes per run of a task: one per GPU of the run where the task has GPUs."""
    return gpus_per_run if req.gpus_per_task and gpus_per_run > 1 else 1


def _processes(req: Request, gpus_per_run: int) -> Request:
    """A task with GPUs trains each run with one process per GPU of the run (--gpus-per-run)."""
    if req.gpus_per_task and gpus_per_run > 1:
        if req.gpus_per_task < gpus_per_run:
            raise ConfigError("--gpus-per-task", "", f"{req.gpus_per_task} GPU(s) per task cannot hold a run "
                                                     f"of --gpus-per-run {gpus_per_run}")
        req.nproc = gpus_per_run
    return req


def script_text(req: Request, worker_cmd: list[str], folder: Path, name: str) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name=abexp-{name}", f"#SBATCH --array=0-{req.array - 1}",
             f"#SBATCH --cpus-per-task={req.cpus_per_task}", f"#SBATCH --output={folder}/%A_%a.out",
             "#SBATCH --open-mode=append", "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR1@{req.signal_grace_s}"]
    for flag, value in (("mem", req.mem), ("partition", req.partition), ("account", req.account),
                        ("qos", req.qos), ("time", req.time)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    if req.gpus_per_task:
        lines.append(f"#SBATCH --gres=gpu:{req.gpus_per_task}")
    if req.nproc > 1:  # the worker starts each run under torchrun with this many processes
        lines.append(f"export ABEXP_NPROC={req.nproc}")
    if os.environ.get("ABEXP_PLUGINS"):  # the plugins this submission loaded (abexp.registry)
        lines.append(f"export ABEXP_PLUGINS={shlex.quote(os.environ['ABEXP_PLUGINS'])}")
    if os.environ.get(ELSEWHERE):  # the rows files of runs finished elsewhere (abexp.lab.elsewhere)
        lines.append(f"export {ELSEWHERE}={shlex.quote(os.environ[ELSEWHERE])}")
    lines += [f"export ABEXP_SLURM_FOLDER={shlex.quote(str(folder))}",
              "# exec: the worker itself receives SLURM's signals (see abexp/train/preempt.py)",
              "exec " + " ".join(shlex.quote(part) for part in worker_cmd), ""]
    return "\n".join(lines)


def sbatch(script: Path, *extra: str) -> str:
    """Submit; the job id. An id printed is a job submitted, whatever the exit status says."""
    out = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True)
    job = out.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise RuntimeError(f"sbatch {script}: {out.stderr.strip() or out.stdout.strip() or out.returncode}")
    return job


def submit(req: Request, spec_path: str, results: str, session: str, folder: str | Path,
           overrides: list[str] | None = None) -> tuple[str, Path]:
    """Write the array script and submit it; returns (job id, session folder)."""
    if shutil.which("sbatch") is None:
        raise ConfigError("--backend", "", "slurm: sbatch not found on PATH")
    here = Path(folder).resolve() / session
    spec_path, results = str(Path(spec_path).resolve()), str(Path(results).resolve())
    cmd = [sys.executable, "-m", "abexp.lab.runner", spec_path, results, session, *(overrides or [])]
    io.write_text(here / SCRIPT, script_text(req, cmd, here, Path(spec_path).stem))
    job = sbatch(here / SCRIPT)
    record_job(here, job)
    return job, here


def record_job(folder: Path, job: str) -> None:
    with open(folder / JOBS, "a") as fh:
        fh.write(job + "\n")


def requeue_self(log=print) -> str | None:
    """After a signal stopped this task: put a worker back in SLURM's queue, unless the session
    was cancelled with ``abexp cancel``. Returns the new job id, or None.

    A fresh ``sbatch`` of the same script rather than ``scontrol requeue``: that one kills the
    calling task at once, cannot requeue a job being cancelled, and holds the requeued job
    back (BeginTime). If SLURM requeues the job as well (PreemptMode=REQUEUE), the extra
    worker finds the runs claimed or done and exits.
    """
    folder = Path(os.environ.get("ABEXP_SLURM_FOLDER", ""))
    task = slurm_task()
    if not task or not (folder / SCRIPT).exists():
        return None
    if (folder / STOP).exists():
        log(f"task {task}: stopped by abexp cancel; not requeued")
        return None
    new = sbatch(folder / SCRIPT, f"--array={os.environ.get('SLURM_ARRAY_TASK_ID', '0')}")
    record_job(folder, new)
    log(f"task {task}: checkpointed and requeued as job {new}")
    return new


def cancel(folder: str | Path) -> list[str]:
    """Stop every job of every session under ``folder`` for good: markers first, then scancel.
    A second pass catches a replacement submitted by a task that checked just before the marker."""
    sessions = sorted(p.parent for p in Path(folder).glob(f"*/{JOBS}"))
    for session in sessions:
        io.write_text(session / STOP, f"{time.time()}\n")
    cancelled: list[str] = []
    for attempt in range(2):
        for session in sessions:
            ids = [i for i in (session / JOBS).read_text().split() if i not in cancelled]
            if ids:
                subprocess.run(["scancel", *ids], capture_output=True)
                cancelled += ids
        if attempt == 0 and cancelled:
            time.sleep(2)
    return cancelled
