"""A run folder's files and states, named in one place.

Every module that reads or writes ``RESULTS/runs/<run_id>/`` goes through ``RunFolder``, so
the on-disk format (which stored results folders must keep reading and resuming) is spelled
once: config.yaml, metrics.jsonl (one line per epoch), checkpoint.pt (replaced atomically each
epoch), events.jsonl (who trained it when), log.txt and failed.json (a worker's log and its
last crash), claim.lock (abexp.lab.claims), trace.txt (an async run's arrivals), plugins.json
(the versions of the plugins it ran with), model.pt and, written atomically last, result.json:
the completion marker.

The state vocabulary (``STATES``) is read from these files alone. Whether a claim is live is
the lab's to judge (abexp.lab.claims), so ``state`` takes that judgement as a function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

# one of these, from the files alone: the one vocabulary of plan, status, collect and progress
STATES = ("completed", "diverged", "pruned", "running", "partial", "failed", "pending", "damaged")


class RunFolder:
    """One run's folder: the path of each file it holds, and its state."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    RESULT = "result.json"
    WEIGHTS = "model.pt"
    EVENTS = "events.jsonl"
    LOG = "log.txt"
    FAILED = "failed.json"
    LOCK = "claim.lock"
    TAKEOVER = "claim.takeover"
    TRACE = "trace.txt"
    PLUGINS = "plugins.json"  # {plugin module: version}, only when plugins were loaded

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, results: str | Path, run_id: str) -> RunFolder:
        """The folder of run ``run_id`` in a results folder (``RESULTS/runs/<run_id>``)."""
        return cls(runs_dir(results) / run_id)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def result(self) -> Path:
        return self.path / self.RESULT

    @property
    def weights(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def events(self) -> Path:
        return self.path / self.EVENTS

    @property
    def plugins(self) -> Path:
        return self.path / self.PLUGINS

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    @property
    def failed(self) -> Path:
        return self.path / self.FAILED

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def takeover(self) -> Path:
        return self.path / self.TAKEOVER

    @property
    def trace(self) -> Path:
        return self.path / self.TRACE

    def damaged_checkpoint(self, stamp: str) -> Path:
        """Where an unreadable checkpoint is moved aside (never deleted)."""
        return self.path / f"checkpoint.damaged-{stamp}.pt"

    def finished(self) -> bool:
        """result.json exists: the run ended (completed, diverged or pruned) and is never trained again."""
        return self.result.exists()

    def started(self) -> bool:
        """A checkpoint exists: the run resumes from it rather than starting fresh."""
        return self.checkpoint.exists()

    def read_result(self) -> dict:
        """result.json as written (OSError, ValueError when missing or damaged)."""
        return json.loads(self.result.read_text())

    def read_failure(self) -> dict:
        """failed.json as written (OSError, ValueError when missing or damaged)."""
        return json.loads(self.failed.read_text())

    def failed_in(self, session: str) -> bool:
        """Did this run fail in worker session ``session`` (not retried within it)?"""
        try:
            return self.read_failure().get("session") == session
        except (OSError, ValueError, AttributeError):
            return False

    def state(self, claim_live: Callable[[Path], bool] = lambda lock: True) -> str:
        """One of STATES, from the files alone; ``claim_live(lock)`` says whether an existing
        claim.lock is held by a live worker (abexp.lab.claims). Finished runs say how
        (result.json's status)."""
        if self.finished():
            try:
                status = self.read_result()["status"]
            except (OSError, ValueError, KeyError, TypeError):
                return "damaged"
            return status if status in STATES else "damaged"
        if self.lock.exists() and claim_live(self.lock):
            return "running"
        if self.failed.exists():
            return "failed"
        if self.started():
            return "partial"
        return "pending"


def runs_dir(results: str | Path) -> Path:
    """Where a results folder keeps its run folders."""
    return Path(results) / "runs"
