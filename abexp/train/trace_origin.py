"""Where an async run's ``trace.txt`` was made, so that its replay runs there and stays bitwise.

A replay (``delay.kind: trace`` with a trace whose lines carry a batch column) recomputes every
gradient and update of its async run. That is bitwise only on the same device (the crops come
from that device's generator) and with the same torch thread counts (CPU reductions split by
thread): the server's for updates and evaluation, the workers' for gradients. The async server
writes both into the trace's header (``# device: cpu, threads: 2, worker threads: 1``); a
replay reads them, runs on that device (``device: auto`` included; any other device is refused
with one line) and sets torch's threads from them, restoring the process's own at the end.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from abexp.config import ConfigError, RunConfig, read_trace_columns

LINE = re.compile(r"#\s*device:\s*([a-z]+)\s*,\s*threads:\s*([0-9]+)\s*,\s*worker threads:\s*([0-9]+)\s*$")


@dataclass(frozen=True)
class Origin:
    """The device and torch thread counts of an async run. The defaults are those of a trace
    written before the header line existed: CPU, one thread per process (the condition
    docs/async.md stated for bitwise replays)."""

    device: str = "cpu"
    threads: int = 1          # the server's: updates, BN recalibration, evaluation
    worker_threads: int = 1   # each worker's: the gradients

    def line(self) -> str:
        return f"# device: {self.device}, threads: {self.threads}, worker threads: {self.worker_threads}\n"

    def device_for(self, requested: str, trace: str) -> str:
        """The device a replay runs on: this one, whatever ``auto`` would pick; another asked
        for explicitly is a ConfigError (a replay there would not be its run)."""
        if requested == "auto" or torch.device(requested).type == self.device:
            return self.device
        raise ConfigError(trace, "delay.trace", f"replays an async run that ran on {self.device}, bitwise only "
                          f"there (its crops come from {self.device}'s generator): run it with --device "
                          f"{self.device} or auto, not {requested}")

    def gradient_threads(self) -> contextlib.AbstractContextManager:
        """Inside: the workers' thread count (nothing to switch when it is the server's)."""
        return contextlib.nullcontext() if self.worker_threads == self.threads else _threads(self.worker_threads)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_origin(path: str | Path) -> Origin:
    """The origin line of a trace's comment lines, else the defaults (an older trace)."""
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break  # the header comes first
        match = LINE.match(line.strip())
        if match:
            return Origin(match[1], int(match[2]), int(match[3]))
    return Origin()


def replay_origin(cfg: RunConfig) -> Origin | None:
    """The origin of the async run ``cfg`` replays, or None when it replays none (another
    delay kind, a histogram, a trace of delays only)."""
    if cfg.delay.kind != "trace" or not cfg.delay.trace:
        return None
    if read_trace_columns(cfg.delay.trace, cfg.delay.steps)[1] is None:
        return None
    return read_origin(cfg.delay.trace)
