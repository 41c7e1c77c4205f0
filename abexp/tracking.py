"""Run tracking: metrics.jsonl always (written by abexp.train); Weights & Biases when enabled.

``tracking.wandb.mode``: ``auto`` is online when an API key is configured (WANDB_API_KEY or a
netrc entry for the W&B host), else offline; an environment variable WANDB_MODE, when set,
overrides the config (tests force ``disabled``). The W&B run id is abexp's run_id with
``resume="allow"``, so a re-run or resumed run never creates a duplicate; offline runs land in
``<run dir>/wandb/offline-run-*-<run_id>`` and are uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

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


class Tracker:
    """Mirror per-epoch metrics and the final result to W&B (no-op when disabled)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, run_id: str):
        self.run = None
        w = cfg.tracking.wandb
        self.mode = resolve_mode(w.mode)
        if self.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=w.project, entity=w.entity, group=w.group or cfg.experiment or None,
            tags=list(w.tags), id=run_id, name=run_id, resume="allow", mode=self.mode,
            dir=str(run_dir), config=cfg.model_dump(), reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", init_timeout=30))

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if v is not None}, step=int(row["epoch"]))

    def finish(self, result: dict[str, Any]) -> None:
        if self.run is not None:
            for key in ("status", "test_acc", "best_test_acc", "epochs_completed", "steps", "wall_s"):
                self.run.summary[key] = result.get(key)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
