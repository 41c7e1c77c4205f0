"""``train_run``: train (or resume, or skip) one run, with the trainer its config asks for:
``Run`` (simulated delay) or ``AsyncRun`` (delay.kind async: a parameter server and workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from abexp.config import RunConfig
from abexp.train import lifecycle
from abexp.train.async_ps import AsyncRun, launched_world, release_launched_workers
from abexp.train.run import Run


def train_run(cfg: RunConfig, out_dir: str | Path, device: str = "auto",
              stop_after_epochs: int | None = None, log: Callable[[str], None] = print,
              on_epoch: Callable[[dict], bool] | None = None) -> dict | None:
    """Train (or resume, or skip if finished) the run ``cfg`` in ``out_dir``.

    Returns result.json's content, or None when stopped early by ``stop_after_epochs``.
    """
    out = Path(out_dir)
    done = lifecycle.finished_result(out, cfg)
    if done is not None:
        if cfg.delay.kind == "async" and launched_world() is not None:
            release_launched_workers(cfg)  # torchrun/srun started workers for it: let them go
        return done
    threads = torch.get_num_threads()  # a replay sets its async run's (abexp.train.trace_origin)
    try:
        if cfg.delay.kind == "async":  # a parameter server and its worker processes
            run: Run = AsyncRun(cfg, out, device, log)
        else:
            run = Run(cfg, out, device, log)  # loads data: bad data folders fail before anything is written
        prune = (lambda i, row: on_epoch(row)) if on_epoch is not None else None
        try:
            results = lifecycle.train(run, stop_after_epochs, prune, log)
        finally:
            getattr(run, "close", lambda: None)()
    finally:
        torch.set_num_threads(threads)
    return None if results is None else results[0]
