"""Exactly-once claims on runs, safe across processes and machines on a shared filesystem.

A claim is ``runs/<run_id>/claim.lock``, created with O_CREAT|O_EXCL (atomic: one creator
wins) and holding host, pid and a token. Its mtime is the heartbeat: the holder refreshes it
through the file descriptor it created the lock with, so after a takeover (the old lock
unlinked, a new one created) the old holder's heartbeat touches only its own, unlinked inode,
never the new holder's lock.

A claim is stale when its pid is dead on this host, or its heartbeat is older than
``stale_after`` seconds *in the shared filesystem's own clock*: the checker touches a probe
file beside the run folders and compares the two mtimes, both stamped by the file server, so
no host's clock skew steals a live claim or keeps a dead one. Taking over a stale claim is
serialised by a second O_EXCL file, ``claim.takeover``, so two takers cannot both win.

Fencing: a holder calls ``Claim.check()`` immediately before every write into the run folder
(abexp.io does it just before the atomic rename of each file) and before every W&B log; a
claim found lost raises ``ClaimLost``, and the holder writes nothing more there. The window
that remains is one rename: a holder frozen between its check and its rename lands that one
file late (docs/clusters.md, "Exactly once").
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from abexp.train.folder import RunFolder

LOCK, TAKEOVER = RunFolder.LOCK, RunFolder.TAKEOVER
HEARTBEAT_S = float(os.environ.get("ABEXP_HEARTBEAT_S", "10"))
STALE_AFTER_S = float(os.environ.get("ABEXP_STALE_AFTER_S", "120"))
TORN_AFTER_S = 5.0  # an unreadable lock this old is a creator that died mid-write
TAKEOVER_STALE_S = 60.0  # a takeover mutex this old is a taker that died mid-takeover
# the holder's environment for a child process that writes the run folder (torchrun ranks)
LOCK_ENV, TOKEN_ENV = "ABEXP_CLAIM_LOCK", "ABEXP_CLAIM_TOKEN"


class ClaimLost(Exception):
    """This process no longer holds the run it was training: another worker took it over."""


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


def fs_now(folder: Path) -> float:
    """The shared filesystem's current time: the mtime of a probe file just touched in
    ``folder`` (stamped by the file server on NFS, not by this host's clock)."""
    probe = folder / f".clock.{socket.gethostname()}"
    try:
        os.utime(probe)
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
    return probe.stat().st_mtime


def file_age(path: Path) -> float:
    """Seconds since ``path`` was last modified, in the filesystem's clock (FileNotFoundError
    when it is gone). The probe lives one folder above the file's own folder (beside the
    run folders), so that checking a run writes nothing into it."""
    mtime = path.stat().st_mtime
    return fs_now(path.parent.parent) - mtime


def is_stale(lock: Path, stale_after: float = STALE_AFTER_S) -> bool:
    info = _read(lock)
    try:
        age = file_age(lock)
    except FileNotFoundError:
        return False
    if info is None:  # torn write by a dying creator
        return age > TORN_AFTER_S
    if info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", -1))):
        return True
    return age > stale_after


class Claim:
    """A held claim: ``check`` before each write, ``touch`` to beat, ``release`` to give it up.

    The claim is its lock file's inode and token: the descriptor opened at creation keeps the
    inode, so holding is decided by comparing inodes and tokens, never by the path alone.
    """

    def __init__(self, lock: Path, token: str, fd: int | None = None):
        self.lock, self.token, self.fd = lock, token, fd

    def held(self) -> bool:
        try:
            if self.fd is not None and os.fstat(self.fd).st_ino != os.stat(self.lock).st_ino:
                return False
        except OSError:
            return False
        info = _read(self.lock)
        return bool(info and info.get("token") == self.token)

    def check(self) -> None:
        """Raise ClaimLost unless this process still holds the claim (the fence)."""
        if not self.held():
            raise ClaimLost(f"{self.lock.parent}: claim lost (another worker took the run over); "
                            "stopped writing there")

    def touch(self) -> None:
        """Refresh the heartbeat of this claim's own lock file (the inode it created)."""
        try:
            if self.fd is not None:
                os.utime(self.fd)
            elif self.held():
                os.utime(self.lock)
        except OSError:
            pass

    def release(self) -> None:
        if self.held():
            self.lock.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def env(self) -> dict[str, str]:
        """What a child process needs to fence its own writes (``from_env``)."""
        return {LOCK_ENV: str(self.lock), TOKEN_ENV: self.token}


def from_env() -> Claim | None:
    """The claim a parent worker holds for this process's run folder, if it passed one."""
    lock, token = os.environ.get(LOCK_ENV), os.environ.get(TOKEN_ENV)
    return Claim(Path(lock), token) if lock and token else None


def slurm_task() -> str | None:
    """This SLURM task as scancel/squeue name it: ARRAYID_TASK for an array task, else the job id.
    (An array task's raw SLURM_JOB_ID can equal the array's own id, which names every task.)"""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def create_lock(lock: Path, **extra) -> Claim | None:
    """Create ``lock`` exclusively with this process's identity and a fresh token, or None
    when it exists. The returned claim keeps the descriptor (heartbeat, fencing)."""
    token = uuid.uuid4().hex
    info = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "started": time.time(),
            **extra}
    if slurm_task():  # who holds it, as squeue and scancel name it
        info["slurm_job"] = slurm_task()
    body = json.dumps(info).encode()
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    os.write(fd, body)
    os.fsync(fd)
    return Claim(lock, token, fd)


def try_claim(run_dir: Path, stale_after: float = STALE_AFTER_S) -> Claim | None:
    """Claim ``run_dir`` or return None when a live holder has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    claim = create_lock(lock)
    if claim is not None or not is_stale(lock, stale_after):
        return claim
    takeover = run_dir / TAKEOVER
    try:
        if file_age(takeover) > TAKEOVER_STALE_S:
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
        return create_lock(lock)
    finally:
        takeover.unlink(missing_ok=True)


class Heartbeat:
    """Background thread refreshing the heartbeat of every claim this process holds."""

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

    TICK_S = 0.25  # how soon stop() takes effect

    def _run(self) -> None:
        # Plain short sleeps, not ``Event.wait(timeout)``: a timed wait takes a CLOCK_MONOTONIC
        # deadline, and under a shifted clock (libfaketime, as the skewed-clock tests run) it
        # never returns, so the heartbeat would stop and every claim would look dead. Ticks are
        # counted, not timed, so no clock is read at all.
        ticks = max(1, round(self.interval / self.TICK_S))
        tick = min(self.interval, self.TICK_S)
        while True:
            for _ in range(ticks):
                time.sleep(tick)
                if self._stop.is_set():
                    return
            with self._lock:
                for claim in list(self.claims):
                    claim.touch()

    def stop(self) -> None:
        """Stop beating; returns once no beat is under way (a released claim's descriptor may
        then be closed and its number reused safely)."""
        self._stop.set()
        self._thread.join(timeout=5 * self.TICK_S)
