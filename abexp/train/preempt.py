"""Graceful stop on SIGTERM / SIGUSR1 / SIGUSR2: the signals SLURM sends on ``scancel``,
pre-emption and an approaching time limit (``--signal``).

The handler only records the signal. Training checks ``requested()`` after every optimizer
step, saves a mid-epoch checkpoint and raises ``Preempted``; the worker releases its claim
and, under SLURM, requeues itself (abexp.lab.slurm). Installed by SLURM workers only: a local
worker dies with its runner instead.
"""

from __future__ import annotations

import ctypes
import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_received: int | None = None


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the run resumes from it."""


def _record(signum: int, frame) -> None:
    global _received
    _received = signum


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _record)


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
