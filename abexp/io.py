"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Writes into a *fenced* folder (``fenced``: a run folder whose claim this process holds) first
call the fence's check, just before the rename that publishes the file: a worker that lost its
claim raises there and its file never appears. Appends to a fenced folder are rewrites of the
whole file, so that they too publish by one rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


class WriteError(OSError):
    """A write the file system refused (full disk, permissions); the message names the file.
    The file it would have replaced is untouched."""


_fences: dict[Path, Callable[[], None]] = {}


@contextlib.contextmanager
def fenced(folder: str | Path, check: Callable[[], None]) -> Iterator[None]:
    """Within this block every write through this module into ``folder`` calls ``check()``
    just before it is published (``check`` raises to refuse the write)."""
    key = Path(folder).resolve()
    _fences[key] = check
    try:
        yield
    finally:
        _fences.pop(key, None)


def check_fence(path: str | Path) -> None:
    """Run the fence of the folder holding ``path`` (a write about to happen there), if any."""
    if not _fences:
        return
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder in _fences:
            _fences[folder]()
            return


def _atomic(path: Path, write) -> None:
    tmp = None
    try:
        check_fence(path)  # a worker that lost its claim does not even create the temporary file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        check_fence(path)  # the last moment before the file appears: the window is one rename
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(err)
        if cause is not None and not isinstance(err, WriteError):
            raise WriteError(cause.errno, f"{path}: cannot write ({cause.strerror or cause})") from None
        raise


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (torch.save re-raises a failed write as a RuntimeError)."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda fh: fh.write(data))


def write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda fh: fh.write(text.encode()))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch(path: str | Path, obj: Any) -> None:
    _atomic(Path(path), lambda fh: torch.save(obj, fh))


def remove(path: str | Path) -> None:
    """Delete a file of a run folder (fenced like a write)."""
    check_fence(path)
    Path(path).unlink(missing_ok=True)


def load_torch(path: str | Path, map_location=None) -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line (metrics, events): a torn last line is skipped by read_jsonl.
    In a fenced folder the file is rewritten whole and published by one rename."""
    line = json.dumps(row) + "\n"
    if _fences and any(p in _fences for p in Path(path).resolve().parents):
        try:
            old = Path(path).read_bytes()
        except FileNotFoundError:
            old = b""
        if old and not old.endswith(b"\n"):  # a torn last line (a crash mid-append) is dropped
            old = old[:old.rfind(b"\n") + 1]
        write_bytes(path, old + line.encode())
        return
    try:
        with open(path, "a") as fh:
            fh.write(line)
    except OSError as err:
        raise WriteError(err.errno, f"{path}: cannot append ({err.strerror or err})") from None


class DamagedFile(Exception):
    """A results file that cannot be read as written; the message names the file."""


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file. A torn *last* line (a crash mid-write) is dropped: every
    row before it is intact. A bad line with rows after it is damage, not a crash: DamagedFile."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [(i, line.strip()) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)]
    lines = [(i, line) for i, line in lines if line]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                break
            raise DamagedFile(f"{path}: line {i} is not JSON (and later lines are)") from None
        if not isinstance(row, dict):
            raise DamagedFile(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    return rows
