"""Runs finished on another machine: a long study's committed rows say which, so they are not run twice.

A study such as experiments/fashion_mnist_evidence.yaml outlives the machines it runs on: its
results folder is not committed, but each finished run's summary row is
(``results/<study>_runs.csv``, analysis/study_rows.py). On a new machine ``abexp run SPEC
--done-rows ROWS.csv`` leaves out the planned runs whose ``run_id`` has a finished row there
(status completed or diverged; a rows file without a status column has only completed runs).
The command sets ``ABEXP_DONE_ROWS`` (paths separated by ``os.pathsep``), which every worker it
starts inherits (a SLURM job script exports it), so the launcher and its workers plan the same runs.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING

from abexp.config import ConfigError

if TYPE_CHECKING:
    from abexp.lab.spec import PlannedRun

ENV = "ABEXP_DONE_ROWS"
FINISHED = ("completed", "diverged")  # what a rows file holds (analysis/study_rows.py): a diverged run is a result too


def read_finished_ids(path: str | Path, flag: str = "--done-rows") -> set[str]:
    """The run ids with a finished row in the rows file ``path``; a file that is not one is one
    line naming it and the missing column (ConfigError, exit 2)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = csv.DictReader(f)
            columns = rows.fieldnames or []
            if "run_id" not in columns:
                raise ConfigError(str(path), "run_id", f"no such column: not a study's rows file ({flag})")
            return {row["run_id"] for row in rows
                    if row["run_id"] and row.get("status", "completed") in FINISHED}
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(flag, "", f"{path}: {err.strerror if isinstance(err, OSError) else err}") from None


def remember(paths: list[str]) -> None:
    """Check each rows file now, then hand the list to every process this one starts."""
    if not paths:
        return
    for path in paths:
        read_finished_ids(path)
    known = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    added = [str(Path(p).resolve()) for p in paths]
    os.environ[ENV] = os.pathsep.join(known + [p for p in dict.fromkeys(added) if p not in known])


def finished_elsewhere() -> set[str]:
    """The run ids that the rows files in ``ABEXP_DONE_ROWS`` report finished."""
    ids: set[str] = set()
    for path in os.environ.get(ENV, "").split(os.pathsep):
        if path:
            ids |= read_finished_ids(path, ENV)
    return ids


def to_run_here(plan: list[PlannedRun]) -> list[PlannedRun]:
    """``plan`` without the runs finished elsewhere (the whole plan when no rows file is named)."""
    done = finished_elsewhere()
    return [run for run in plan if run.run_id not in done] if done else plan
