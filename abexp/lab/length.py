"""How long a run is, in optimizer steps, and how large its delay is against that: shown by
``abexp plan`` and ``abexp run`` before anything trains, so a delay that is a large share of
training (a study that proves nothing) is seen before the compute is spent."""

from __future__ import annotations

from abexp.config import RunConfig, read_trace
from abexp.registry import DATASETS

LARGE_SHARE = 0.05  # a delay above 5% of a run's steps is warned about


def train_examples(cfg: RunConfig) -> int:
    """Examples per epoch: the dataset's train split (or ``data.subset`` of it), less the
    examples data.val_split holds out (abexp.data.common.validation_indices rounds the same)."""
    n = full_train_examples(cfg)
    n = min(n, cfg.data.subset) if cfg.data.subset else n
    return n - int(round(n * cfg.data.val_split)) if cfg.data.val_split else n


def full_train_examples(cfg: RunConfig) -> int:
    """The dataset's full train split: its record's count (a number or a function of the
    config), or, where the record gives none (a plugin's in-memory dataset), counted by
    loading it once per process."""
    known = DATASETS.get(cfg.data.name).train_examples
    if callable(known):
        return int(known(cfg))
    if known is not None:
        return int(known)
    key = (cfg.data.name, cfg.data.root, cfg.data.split_seed)
    if key not in _counted:
        from abexp.data.load import load_dataset
        _counted[key] = len(load_dataset(cfg).train_y)
    return _counted[key]


_counted: dict[tuple, int] = {}


def steps_per_run(cfg: RunConfig) -> int:
    """Optimizer steps of the whole run (the last partial batch of an epoch is dropped)."""
    return (train_examples(cfg) // cfg.train.batch_size) * cfg.train.epochs


def largest_delay(cfg: RunConfig) -> int:
    """The largest delay any step of the run can see, in steps (an async run: its mean staleness)."""
    d = cfg.delay
    if d.kind == "pipeline":
        from abexp.sim.pipeline import stage_delays
        return max(stage_delays(d))
    if d.kind == "trace":
        return max(read_trace(d.trace, d.steps)) if d.trace else max(d.histogram)
    if d.kind == "async":  # not known before it runs: its mean, N - 1 (N items always in flight)
        return d.workers - 1
    return d.steps


def delay_share(cfg: RunConfig) -> float:
    return largest_delay(cfg) / max(1, steps_per_run(cfg))


def describe(cfg: RunConfig) -> str:
    """``steps 5,625  delay 32 (0.57%)``: a run's length and its largest delay's share."""
    return f"steps {steps_per_run(cfg):,}  delay {largest_delay(cfg)} ({delay_share(cfg):.2%})"


def summary(configs: list[RunConfig]) -> list[str]:
    """One line on the runs' lengths and largest delay, then a warning when a delay is over
    LARGE_SHARE of its run's training."""
    if not configs:
        return []
    steps = sorted({steps_per_run(c) for c in configs})
    worst = max(configs, key=delay_share)
    length = f"{steps[0]:,} steps per run" if len(steps) == 1 else f"{steps[0]:,}-{steps[-1]:,} steps per run"
    lines = [f"{length}; largest delay {largest_delay(worst)} steps = {delay_share(worst):.2%} of its run's training"]
    large = [c for c in configs if delay_share(c) > LARGE_SHARE]
    if large:
        lines.append(f"warning: {len(large)} run(s) have a delay over {LARGE_SHARE:.0%} of their training "
                     f"(up to {delay_share(worst):.1%}): the delay then spans a large part of the run, not a "
                     "steady state; train longer (train.epochs) or use smaller delays")
    return lines
