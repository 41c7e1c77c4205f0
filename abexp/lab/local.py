"""The local launch backend: N worker processes on this machine, each running
``abexp.lab.runner``'s worker loop (claim, train, release), with a progress bar.

The workers share out this machine's GPUs (``gpu_slots``: CUDA_VISIBLE_DEVICES names, one
group of ``--gpus-per-run`` per worker, ``--runs-per-gpu`` workers per group) and CPU threads
(``thread_share``); each dies with the supervising process (PR_SET_PDEATHSIG), so a killed
``abexp run`` leaves no orphan training a run that a restarted one would train twice. Sweeps
start their workers with the same ``supervise`` (abexp.lab.sweep).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from abexp.config import ConfigError
from abexp.lab.backends import Launch
from abexp.lab.elsewhere import to_run_here
from abexp.lab.spec import PlannedRun, load_spec
from abexp.train.folder import RunFolder, runs_dir
from abexp.train.preempt import die_with_parent


class LocalBackend:
    """``abexp run --backend local`` (the default): workers on this machine."""

    name = "local"

    def check(self, launch: Launch) -> None:
        """Nothing beyond the shared preflight: this machine's GPU slots are checked as the
        workers start (``gpu_slots``), since a spec whose runs are all done starts none."""

    def launch(self, launch: Launch) -> int:
        return run_local(launch.spec_path, launch.results, launch.workers, launch.gpus, launch.runs_per_gpu,
                         progress=launch.progress, overrides=launch.overrides,
                         gpus_per_run=launch.gpus_per_run, pack=launch.pack)


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


def gpu_slots(workers: int | None, gpus: list[str] | None, runs_per_gpu: int,
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


def run_local(spec_path: str, results: str, workers: int | None = None,
              gpus: list[str] | None = None, runs_per_gpu: int = 1, progress: bool = True,
              overrides: list[str] | None = None, gpus_per_run: int = 1, pack: int = 1) -> int:
    """Start the workers, show progress, return 0 when every run ended done (or diverged)."""
    plan = to_run_here(load_spec(spec_path, overrides).expand(warn=lambda msg: None))
    ids = [r.run_id for r in plan]
    root = runs_dir(results)
    session = uuid.uuid4().hex[:12]
    done = lambda: sum(RunFolder(root / rid).finished() for rid in ids)  # noqa: E731
    if not ids:
        print(f"nothing to run here: every run of {spec_path} finished elsewhere")
        return 0
    if done() == len(ids):
        print(f"all {len(ids)} runs of {spec_path} are done")
        return 0
    slots = gpu_slots(workers, gpus, runs_per_gpu, gpus_per_run)
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
    failed = [rid for rid in ids if RunFolder(root / rid).failed_in(session)]
    crashed = [code for code in codes if code != 0]
    for rid in failed:
        print(f"failed: {rid} (traceback in {RunFolder(root / rid).log})", file=sys.stderr)
    if crashed:
        print(f"{len(crashed)} worker(s) exited abnormally: {crashed}", file=sys.stderr)
    return 1 if failed or crashed or done() < len(ids) else 0
