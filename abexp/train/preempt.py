"""Graceful stop on SIGTERM / SIGUSR1 / SIGUSR2: the signals SLURM sends on ``scancel``,
pre-emption and an approaching time limit (``--signal``).

The handler only records the signal. Training checks ``requested()`` after every optimizer
step, saves a mid-epoch checkpoint and raises ``Preempted``; the worker releases its claim
and, under SLURM, requeues itself (abexp.lab.slurm). Installed by SLURM workers only: a local
worker dies with its runner instead.

A multi-process run is a chain: the worker starts ``abexp train --nproc N`` (the launcher),
which starts torchrun, which starts the ranks. SLURM signals the worker alone, so each link
passes a stop on (``run_forwarding``): as SIGUSR1, which the children of a forwarding parent
ignore until they install this handler (torchrun itself never does, so it is not stopped), and
again every poll until the child exits, so a rank still starting up hears it too. The ranks
then agree on the step to stop at (``abexp.train.run.Run``): each may hear it at another one.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
FORWARDED = "ABEXP_FORWARDED_STOP"  # set for the processes a forwarding parent starts
POLL_S = 0.5
_received: int | None = None


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the run resumes from it."""


def _record(signum: int, frame) -> None:
    global _received
    _received = signum


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _record)
    atexit.unregister(_ignore_forwarded)  # once, however often installed
    atexit.register(_ignore_forwarded)


def _ignore_forwarded() -> None:
    """At exit: a stop passed on once more (``run_forwarding`` repeats it) must not kill this
    process as it ends; Python resets a handler it set to the default (fatal) one at shutdown,
    but leaves an ignored signal ignored."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def requested() -> int | None:
    """The signal received since ``install`` (or None)."""
    return _received


def reset() -> None:
    global _received
    _received = None


def die_with_parent() -> None:
    """preexec_fn of a child process: the kernel kills it when its parent dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def install_if_forwarded() -> None:
    """In a process started by ``run_forwarding`` (a launcher, a rank): hear the stop it passes on."""
    if os.environ.get(FORWARDED):
        install()


def _forwarded_child() -> None:
    """preexec_fn of a forwarding parent's child: die with the parent, and ignore SIGUSR1/2
    (ignoring survives exec) until the child installs the handler, so none kills it early."""
    die_with_parent()
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def run_forwarding(cmd: list[str], grandchildren: bool = False, **popen: object) -> int:
    """Run ``cmd`` to its end; a stop signal this process records meanwhile is passed on as
    SIGUSR1 to the child (or, with ``grandchildren``, to the child's children: torchrun's ranks),
    every poll until the child exits. Returns its exit code."""
    env = dict(popen.pop("env", None) or os.environ, **{FORWARDED: "1"})
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_forwarded_child, **popen)
    try:
        while True:
            try:
                return proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if requested() is not None:
                for pid in children(proc.pid) if grandchildren else [proc.pid]:
                    try:
                        os.kill(pid, signal.SIGUSR1)
                    except ProcessLookupError:
                        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
