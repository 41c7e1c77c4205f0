"""Run tracking: metrics.jsonl always (written by abexp.train.run); Weights & Biases when enabled.

``tracking.wandb.mode``: ``auto`` is online when an API key is configured (WANDB_API_KEY or a
netrc entry for the W&B host), else offline, and disabled (with a note) where wandb cannot be
imported (a GPU node's image without it); an environment variable WANDB_MODE, when set,
overrides the config (tests force ``disabled``). The W&B run id is abexp's run_id with
``resume="allow"``, so a re-run or resumed run never creates a duplicate; offline runs land in
``<run dir>/wandb/offline-run-*-<run_id>`` and are uploaded later with ``wandb sync``.

Every epoch reaches W&B exactly once, across kills: an epoch is logged only after its
checkpoint is saved (so W&B never holds an epoch that will be trained again), and a resumed
run first logs the epochs of its history that the W&B run lacks. wandb buffers its offline
log (``.wandb``) for up to 15 s, so a SIGKILL loses what it had not written; what the earlier
offline folders of the run hold is read back with wandb's own reader (``wandb leet inspect
--json``). Online, the server's step count (``run.starting_step`` on resume) says the same.
"""

from __future__ import annotations

import json
import netrc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from abexp import io
from abexp.config import RunConfig


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str) -> str:
    mode = os.environ.get("WANDB_MODE") or configured
    if mode == "dryrun":
        mode = "offline"
    if mode == "auto":
        mode = "online" if _api_key_configured() else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"WANDB_MODE={mode!r}: expected online, offline or disabled")
    return mode


_NOTED: set[str] = set()


def _note_once(msg: str) -> None:
    """A note on stderr, once per process (a worker trains many runs)."""
    if msg not in _NOTED:
        _NOTED.add(msg)
        print(msg, file=sys.stderr, flush=True)


class Tracker:
    """Mirror per-epoch metrics and the final result to W&B (no-op when disabled)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, run_id: str):
        self.run = None
        self.run_dir, self.run_id = Path(run_dir), run_id
        w = cfg.tracking.wandb
        self.mode = resolve_mode(w.mode)
        if self.mode == "disabled":
            return
        try:
            import wandb
        except ImportError as err:
            if (os.environ.get("WANDB_MODE") or w.mode) != "auto":
                raise  # online or offline was asked for by name: no silent fallback
            _note_once(f"note: tracking.wandb.mode auto: wandb cannot be imported ({err}); W&B is disabled "
                       "for this process's runs (metrics.jsonl still holds every epoch)")
            self.mode = "disabled"
            return

        self.run = wandb.init(
            project=w.project, entity=w.entity, group=w.group or cfg.experiment or None,
            tags=list(w.tags), id=run_id, name=run_id, resume="allow", mode=self.mode,
            dir=str(run_dir), config=cfg.model_dump(), reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", init_timeout=30))

    def backfill(self, history: list[dict[str, Any]]) -> list[int]:
        """Log the epochs of ``history`` (from the checkpoint) that the W&B run lacks; returns them."""
        if self.run is None or not history:
            return []
        if self.mode == "offline":
            have = logged_epochs(self.run_dir, self.run_id, exclude=Path(self.run.dir).parent)
        else:  # the server's history holds steps below starting_step
            have = set(range(int(getattr(self.run, "starting_step", 0) or 0)))
        missing = [row for row in history if int(row["epoch"]) not in have]
        for row in missing:
            self.log(row)
        return [int(row["epoch"]) for row in missing]

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            io.check_fence(self.run_dir)  # a worker that lost the run's claim logs nothing more
            self.run.log({k: v for k, v in row.items() if v is not None}, step=int(row["epoch"]))

    def finish(self, result: dict[str, Any]) -> None:
        if self.run is not None:
            io.check_fence(self.run_dir)
            for key in ("status", "test_acc", "best_test_acc", "epochs_completed", "steps", "wall_s"):
                self.run.summary[key] = result.get(key)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_history(wandb_file: Path) -> list[dict[str, Any]]:
    """The history rows of an offline ``.wandb`` log, as wandb's own reader prints them.
    A log cut short by a kill yields the rows before the cut."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                         capture_output=True, text=True)
    rows = []
    for line in out.stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") == "history":
            rows.append(record["history"]["item"])
    return rows


def offline_logs(run_dir: Path, run_id: str) -> list[Path]:
    return sorted(Path(run_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def logged_epochs(run_dir: Path, run_id: str, exclude: Path | None = None) -> set[int]:
    """Epochs already in the earlier offline W&B logs of this run (the current one excluded)."""
    epochs = set()
    for log in offline_logs(run_dir, run_id):
        if exclude is not None and log.parent.resolve() == exclude.resolve():
            continue
        epochs |= {int(row["epoch"]) for row in read_history(log) if "epoch" in row}
    return epochs
