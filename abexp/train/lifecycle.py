"""The life of a run, written once: start (config, checkpoint, metrics rewritten from it, a
``start`` event, W&B backfill), the loop over epochs (stop signals, divergence, evaluation,
checkpoint then metrics line then W&B, pruning) and the end (weights, result.json, an ``end``
event, the checkpoint removed).

A *trainer* (the ``Trainer`` protocol below) supplies only what differs between kinds of run:
how an epoch of steps is taken and how many runs one step serves (``members``: one for
``abexp.train.run.Run`` and ``abexp.train.async_ps.AsyncRun``, K for
``abexp.train.packed.PackedRun``). A trainer whose runs may hold out a validation set is a
``ValidatingTrainer``; ``side_files``, ``stop_requested`` and the optimizers' ``brake_log``
are optional and looked up by name.

A run folder holds config.yaml, metrics.jsonl (one line per epoch), checkpoint.pt (replaced
atomically at the end of each epoch, RNG states included), events.jsonl (who trained it when)
and, written atomically last, result.json: the completion marker. A folder without result.json
is resumed from its checkpoint and ends bitwise-identical (on CPU) to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, cast

from abexp.data.common import has_validation, lower_is_better
from abexp import io
from abexp.config import RunConfig, dump_yaml, load_config, run_id
from abexp.registry import plugin_versions
from abexp.train import preempt
from abexp.train.folder import RunFolder
from abexp.train.tracking import Tracker

# the file names, as older imports know them (abexp.train.folder names them)
CONFIG, METRICS, CHECKPOINT, RESULT, WEIGHTS, EVENTS = (RunFolder.CONFIG, RunFolder.METRICS, RunFolder.CHECKPOINT,
                                                        RunFolder.RESULT, RunFolder.WEIGHTS, RunFolder.EVENTS)

Log = Callable[[str], None]
OnEpoch = Callable[[int, dict], bool]  # (member, row) -> prune this member now


class RunDirError(Exception):
    """The output folder holds a different run."""


@dataclass
class Member:
    """One run served by a trainer's steps: its config, folder, history and fate."""
    cfg: RunConfig
    out: Path
    run_id: str
    history: list[dict] = field(default_factory=list)
    status: str = "running"  # running | completed | diverged | pruned
    tracker: Tracker | None = None
    result: dict | None = None

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.out)


class Trainer(Protocol):
    """What the lifecycle drives. Per member ``i`` (a run of ``members``):

    ``train_epoch`` takes an epoch of steps (or its rest after a mid-epoch checkpoint) and may
    raise ``preempt.Preempted`` after the step during which a stop signal arrived; ``evaluate``
    is one pass over the test set (``bn`` overrides eval.bn). Optional, looked up by name:
    ``side_files(i) -> {name: text}`` (files rewritten with each checkpoint and at the end: an
    async run's trace) and ``stop_requested() -> bool`` (a stop signal as all DDP ranks agree
    on it; else abexp.train.preempt's).
    """
    members: list[Member]
    epoch: int       # epochs completed
    wall_s: float    # training seconds so far, shared among the members
    is_main: bool    # the one process that writes the run folders

    def train_epoch(self) -> list[dict]:
        """Per member: train_loss, train_acc, lr, diverged."""

    def evaluate(self, bn: str | None = None) -> list[tuple[float, float | None]]:
        """Per member: (test loss, test accuracy)."""

    def checkpoint(self, i: int) -> dict:
        """Everything a resumed run needs to continue bitwise (RNG states included)."""

    def restore(self, i: int, state: dict) -> None:
        """Continue from ``checkpoint(i)``'s state."""

    def weights(self, i: int) -> dict:
        """The final weights as a CPU state dict (model.pt)."""

    def result(self, i: int) -> dict:
        """result.json's record."""

    def steps(self, i: int) -> int:
        """Optimizer steps taken."""

    def event_fields(self, end: bool = False) -> dict:
        """Extra fields of the start and end events (device, world size, ...)."""

    def barrier(self) -> None:
        """Wait for every rank (a no-op without DDP)."""


class ValidatingTrainer(Trainer, Protocol):
    """A trainer whose runs may hold out a validation set (``data.val_split``); packs never do."""

    def evaluate(self, bn: str | None = None, split: str = "test") -> list[tuple[float, float | None]]:
        """Per member: (loss, accuracy) on the test set, or with ``split="val"`` on the held-out
        training examples (asked only when data.val_split is set)."""


def train(trainer: Trainer, stop_after_epochs: int | None = None, on_epoch: OnEpoch | None = None,
          log: Log = print) -> list[dict] | None:
    """Start (or resume) every member, train to the end, finish: the members' results, or None
    when stopped early by ``stop_after_epochs`` (resumable)."""
    members, main = trainer.members, trainer.is_main
    if main:
        for m in members:
            m.out.mkdir(parents=True, exist_ok=True)
            io.write_text(m.folder.config, dump_yaml(m.cfg))
            if plugin_versions():  # which plugin code the run used (not part of its id)
                io.write_json(m.folder.plugins, plugin_versions())
    for i, m in enumerate(members):  # every rank resumes from the same checkpoint
        state = read_checkpoint(m.out, m.run_id, main, log)
        if state is not None:
            trainer.restore(i, state)
            where = (f" step {state['step_in_epoch']} of epoch {trainer.epoch + 1}" if state.get("step_in_epoch")
                     else f" epoch {trainer.epoch}")
            log(f"[{m.run_id}] resuming after{where}")
    if len({len(m.history) for m in members}) != 1:
        raise ValueError(f"runs trained together are at different epochs {sorted(len(m.history) for m in members)}")
    trainer.barrier()
    if main:
        for i, m in enumerate(members):
            # metrics.jsonl is rewritten from the checkpoint: an epoch logged after the last
            # checkpoint (a crash in between) is dropped and trained again, never duplicated
            io.write_text(m.folder.metrics, "".join(json.dumps(r) + "\n" for r in m.history))
            event(m.out, "start", from_epoch=trainer.epoch, from_step=trainer.steps(i), **trainer.event_fields())
    try:
        if main:
            for m in members:
                m.tracker = Tracker(m.cfg, m.out, m.run_id)
                backfilled = m.tracker.backfill(m.history)
                if backfilled:
                    log(f"[{m.run_id}] W&B lacked epochs {backfilled} (lost to a kill); logged them from the checkpoint")
        if not fit(trainer, stop_after_epochs, on_epoch, log):
            return None
    finally:
        for m in members:
            if m.tracker is not None:
                m.tracker.close()
                m.tracker = None
    trainer.barrier()
    if main:
        for m in members:
            io.remove(m.folder.checkpoint)
    return [m.result for m in members]


def fit(trainer: Trainer, stop_after_epochs: int | None = None, on_epoch: OnEpoch | None = None,
        log: Log = print) -> bool:
    """The loop over epochs; False when stopped early (``stop_after_epochs``), True at the end.

    Per epoch and member: the row (train and test metrics, wall time, step) goes to the
    history; a diverged member ends at once (its row in metrics.jsonl, no checkpoint); the
    others get their checkpoint written *first*, then the metrics line, then the W&B log, so a
    failed write leaves both files as they were and W&B never holds an epoch trained again.
    ``on_epoch`` returning True prunes the member (Optuna). A stop signal between epochs raises
    ``Preempted`` (the last checkpoint is this state already); during one, the trainer raises
    it after the step in progress and the checkpoint is saved here.
    """
    members, main = trainer.members, trainer.is_main
    epochs = members[0].cfg.train.epochs
    share = len(members)  # a pack's wall time is shared among its runs
    while trainer.epoch < epochs and any(m.status == "running" for m in members):
        if stop_after_epochs is not None and trainer.epoch >= stop_after_epochs:
            return False
        # a DDP trainer's ranks agree on it (Run.stop_requested): one may not have heard it yet
        stop = getattr(trainer, "stop_requested", lambda: preempt.requested() is not None)
        if stop():
            raise preempt.Preempted(f"after epoch {trainer.epoch}")
        start = time.perf_counter()
        try:
            stats = trainer.train_epoch()
        except preempt.Preempted:
            trainer.wall_s += time.perf_counter() - start
            if main:
                for i, m in enumerate(members):
                    if m.status == "running":
                        write_side_files(trainer, i)
                        io.save_torch(m.folder.checkpoint, trainer.checkpoint(i))
            raise
        diverged = [s.pop("diverged") for s in stats]
        for s, brake in zip(stats, brake_fields(trainer)):  # AB rules: the braking applied this epoch
            s.update(brake)
        live = [m.status == "running" and not d for m, d in zip(members, diverged)]
        evals = trainer.evaluate() if any(live) else [(math.nan, None)] * len(members)
        # the validation set, evaluated as the test set is (same BN handling); packs never have one
        has_val = has_validation(members[0].cfg)
        vals = (cast(ValidatingTrainer, trainer).evaluate(split="val") if has_val and any(live)
                else [(math.nan, None)] * len(members))
        trainer.epoch += 1
        epoch_s = time.perf_counter() - start
        trainer.wall_s += epoch_s
        last = trainer.epoch == epochs
        running_bn = None  # how much of the accuracy recalibration recovers: one extra test pass
        if last and any(l and m.cfg.eval.bn == "recalibrate" for l, m in zip(live, members)):
            running_bn = trainer.evaluate(bn="running")
        for i, m in enumerate(members):
            if m.status != "running":
                continue
            test_loss, test_acc = (math.nan, None) if diverged[i] else evals[i]
            val_loss, val_acc = (math.nan, None) if diverged[i] else vals[i]
            val = {"val_loss": val_loss, "val_acc": val_acc} if has_val else {}
            row = {"epoch": trainer.epoch, **stats[i], **val, "test_loss": test_loss, "test_acc": test_acc,
                   "wall_s": round(epoch_s / share, 4), "elapsed_s": round(trainer.wall_s / share, 4),
                   "step": trainer.steps(i)}
            if running_bn is not None and live[i] and m.cfg.eval.bn == "recalibrate":
                row["test_acc_running_bn"] = running_bn[i][1]
            m.history.append(row)
            if share == 1:
                judged = "loss" if lower_is_better(m.cfg) else "acc"  # a language model: nats/char
                val_v, test_v = (val_loss, test_loss) if judged == "loss" else (val_acc, test_acc)
                shown = f"val_{judged} {val_v if val_v is None else round(val_v, 4)} " if has_val else ""
                log(f"[{m.run_id}] epoch {trainer.epoch}/{epochs} loss {row['train_loss']:.4f} {shown}test_{judged} "
                    f"{test_v if test_v is None else round(test_v, 4)} lr {row['lr']:.4g} {epoch_s:.1f}s")
            if diverged[i]:
                m.status = "diverged"
                if main:
                    io.append_jsonl(m.folder.metrics, row)
                if m.tracker:
                    m.tracker.log(row)
                finish(trainer, i)
                continue
            if main:  # one writer; every rank holds the same state
                write_side_files(trainer, i)  # a trace as long as the checkpoint's, or longer
                io.save_torch(m.folder.checkpoint, trainer.checkpoint(i))  # first: a failed write
                io.append_jsonl(m.folder.metrics, row)                     # leaves both as they were
            if m.tracker:  # after the checkpoint: W&B never holds an epoch that is trained again
                m.tracker.log(row)
            if on_epoch is not None and not last and on_epoch(i, row):
                m.status = "pruned"
                finish(trainer, i)
        if share > 1:
            log(f"[pack of {share}] epoch {trainer.epoch}/{epochs} {epoch_s:.1f}s")
    for i, m in enumerate(members):
        if m.status == "running":
            m.status = "completed"
            finish(trainer, i)
    return True


def brake_fields(trainer: Trainer) -> list[dict]:
    """Per member, {brake_mean, brake_sd} of the epoch just trained (abexp.sim.brake), or {}:
    read from each run's optimizer, so no trainer has to report it."""
    engines = getattr(trainer, "engines", None) or [getattr(trainer, "engine", None)]
    logs = [getattr(getattr(e, "optimizer", None), "brake_log", None) for e in engines]
    return [log.read() if log is not None else {} for log in logs]


def finish(trainer: Trainer, i: int) -> None:
    """A member's end: its final weights (CPU tensors), result.json, the ``end`` event, W&B's summary."""
    m = trainer.members[i]
    m.result = trainer.result(i)
    if trainer.is_main:
        write_side_files(trainer, i)
        io.save_torch(m.folder.weights, trainer.weights(i))
        io.write_json(m.folder.result, m.result)
        event(m.out, "end", status=m.status, **trainer.event_fields(end=True))
    if m.tracker is not None:
        m.tracker.finish(m.result)


def write_side_files(trainer: Trainer, i: int) -> None:
    """Files a trainer keeps beside its checkpoint (an async run's trace.txt), rewritten whole
    from the trainer's state: a resumed run rewrites them from its checkpoint, so they never
    hold an update twice."""
    files = getattr(trainer, "side_files", None)
    for name, text in (files(i) if files else {}).items():
        io.write_text(trainer.members[i].out / name, text)


def read_checkpoint(out: Path, run_id: str, main: bool, log: Log) -> dict | None:
    """The checkpoint's state on the CPU (each consumer copies it onto its device), or None.
    A damaged one (truncated, not a torch file) is moved aside, never deleted, and the run
    restarts from its last good state: the start, since one checkpoint is kept (metrics.jsonl
    is then rewritten from the empty history)."""
    path = RunFolder(out).checkpoint
    if not path.exists():
        return None
    try:
        return io.load_torch(path, map_location="cpu")
    except FileNotFoundError:  # another rank moved it aside first
        return None
    except Exception as err:  # zip/pickle errors of a truncated or foreign file
        if main:
            aside = RunFolder(out).damaged_checkpoint(time.strftime('%Y%m%d-%H%M%S'))
            os.replace(path, aside)
            log(f"[{run_id}] {path}: unreadable ({type(err).__name__}); moved to {aside.name}, "
                "restarting from epoch 0")
        return None


def finished_result(out: Path, cfg: RunConfig) -> dict | None:
    """The result of the run ``cfg`` if ``out`` holds it finished, else None; RunDirError when
    the folder holds another run."""
    rid, folder = run_id(cfg), RunFolder(out)
    if folder.finished():
        done = folder.read_result()
        if done.get("run_id") != rid:
            raise RunDirError(f"{folder.result}: belongs to run {done.get('run_id')}, not {rid}")
        return done
    if folder.config.exists():
        other = run_id(load_config(folder.config))
        if other != rid:
            raise RunDirError(f"{folder.config}: folder holds run {other}, not {rid}")
    return None


def event(out: Path, name: str, **fields) -> None:
    """Append to events.jsonl: who trained this run when (audits exactly-once execution)."""
    io.append_jsonl(RunFolder(out).events, {"event": name, "time": time.time(), "host": socket.gethostname(),
                                   "pid": os.getpid(), **fields})
