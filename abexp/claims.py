"""Exactly-once claims on runs, safe across processes and machines on a shared filesystem.

A claim is ``runs/<run_id>/claim.lock``, created with O_CREAT|O_EXCL (atomic: one creator
wins) and holding host, pid and a token; its mtime is the heartbeat, refreshed by the holder.
A claim is stale when its pid is dead on this host, or its heartbeat is older than
``stale_after`` seconds (another host, hung or gone). Taking over a stale claim is serialised
by a second O_EXCL file, ``claim.takeover``, so two takers cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

LOCK, TAKEOVER = "claim.lock", "claim.takeover"
HEARTBEAT_S = float(os.environ.get("ABEXP_HEARTBEAT_S", "10"))
STALE_AFTER_S = float(os.environ.get("ABEXP_STALE_AFTER_S", "120"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_stale(lock: Path, stale_after: float = STALE_AFTER_S) -> bool:
    info = _read(lock)
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if info is None:  # torn write by a dying creator
        return age > 5.0
    if info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", -1))):
        return True
    return age > stale_after


class Claim:
    """A held claim; ``release`` deletes it. The heartbeat thread touches every held claim."""

    def __init__(self, lock: Path, token: str):
        self.lock, self.token = lock, token

    def held(self) -> bool:
        info = _read(self.lock)
        return bool(info and info.get("token") == self.token)

    def release(self) -> None:
        if self.held():
            self.lock.unlink(missing_ok=True)


def slurm_task() -> str | None:
    """This SLURM task as scancel/squeue name it: ARRAYID_TASK for an array task, else the job id.
    (An array task's raw SLURM_JOB_ID can equal the array's own id, which names every task.)"""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _create(lock: Path) -> Claim | None:
    token = uuid.uuid4().hex
    info = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "started": time.time()}
    if slurm_task():  # who holds it, as squeue and scancel name it
        info["slurm_job"] = slurm_task()
    body = json.dumps(info)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    return Claim(lock, token)


def try_claim(run_dir: Path, stale_after: float = STALE_AFTER_S) -> Claim | None:
    """Claim ``run_dir`` or return None when a live holder has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    claim = _create(lock)
    if claim is not None or not is_stale(lock, stale_after):
        return claim
    takeover = run_dir / TAKEOVER
    try:
        if time.time() - takeover.stat().st_mtime > 60:  # a taker died mid-takeover
            takeover.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(takeover, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    os.close(fd)
    try:
        if not is_stale(lock, stale_after):  # re-check under the takeover mutex
            return None
        lock.unlink(missing_ok=True)
        return _create(lock)
    finally:
        takeover.unlink(missing_ok=True)


class Heartbeat:
    """Background thread refreshing the mtime of every claim this process holds."""

    def __init__(self, interval: float = HEARTBEAT_S):
        self.interval, self.claims = interval, set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, claim: Claim) -> None:
        with self._lock:
            self.claims.add(claim)

    def remove(self, claim: Claim) -> None:
        with self._lock:
            self.claims.discard(claim)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for claim in list(self.claims):
                    try:
                        os.utime(claim.lock)
                    except FileNotFoundError:
                        pass

    def stop(self) -> None:
        self._stop.set()
