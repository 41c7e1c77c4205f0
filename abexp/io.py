"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class WriteError(OSError):
    """A write the file system refused (full disk, permissions); the message names the file.
    The file it would have replaced is untouched."""


def _atomic(path: Path, write) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
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


def load_torch(path: str | Path, map_location=None) -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line (metrics, events): a torn last line is skipped by read_jsonl."""
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
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
