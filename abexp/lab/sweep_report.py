"""What a sweep's study holds, for people: ``abexp sweep SWEEP --trials`` (every trial as a
table), ``--best`` (the best trial, and ``--export`` a spec re-running it over seeds), and the
trials table that abexp.figures.sweep draws. Reads the study; never runs a trial.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from abexp import io
from abexp.lab.sweep import journal_path, open_study, storage_url, trial_config
from abexp.lab.sweep_file import Sweep, load_sweep, objective_text


def trials_frame(study):
    """One row per trial: number, state, each parameter, objective, run id (from Optuna's own
    ``trials_dataframe``)."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs"))
    if frame.empty:
        return frame
    keep = ["number", "state", "value"] + [c for c in frame.columns if c.startswith("params_")]
    keep += [c for c in ("user_attrs_run_id", "user_attrs_duplicate_of", "user_attrs_retry_of") if c in frame]
    return frame[keep].rename(columns=lambda c: c.removeprefix("params_").removeprefix("user_attrs_"))


def existing_study(sweep: Sweep, results: str, storage: str | None = None):
    """The sweep's study, or None (said in one line) when it was never created there."""
    url = storage_url(sweep, results, storage)
    journal = journal_path(url)
    if journal is not None and not journal.exists():  # opening it would create it
        print(f"{sweep.name}: no study in {url} yet (run the sweep first)", file=sys.stderr)
        return None
    try:
        return open_study(sweep, url)
    except KeyError:  # optuna: "Record does not exist." -- the study was never created there
        print(f"{sweep.name}: no study in {url} yet (run the sweep first)", file=sys.stderr)
        return None


def trials(sweep_path: str, results: str, storage: str | None = None, overrides: list[str] | None = None) -> int:
    """``abexp sweep SWEEP --trials``: every trial as a table, in trial-number order."""
    import pandas as pd

    sweep = load_sweep(sweep_path, overrides)
    study = existing_study(sweep, results, storage)
    if study is None:
        return 1
    frame = trials_frame(study)
    if frame.empty:
        print(f"{sweep.name}: no trials yet")
        return 0
    for key in sweep.space:
        if key in frame and frame[key].dtype.kind == "f":
            frame[key] = frame[key].map(lambda v: f"{v:.4g}" if v == v else "")
    frame = frame.astype(object)
    frame["value"] = frame["value"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "")
    for key in ("duplicate_of", "retry_of"):
        if key in frame:
            frame[key] = frame[key].map(lambda v: str(int(v)) if pd.notna(v) else "")
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(frame.where(frame.notna(), "").to_string(index=False))
    states = frame["state"].value_counts()
    print(f"{sweep.name}: {len(frame)} trials (" + ", ".join(f"{n} {s}" for s, n in states.items())
          + f"); objective {objective_text(sweep)}")
    return 0


def best(sweep_path: str, results: str, storage: str | None = None, overrides: list[str] | None = None,
         export: str | None = None, seeds: tuple[int, ...] = (0, 1, 2)) -> int:
    from optuna.trial import TrialState

    sweep = load_sweep(sweep_path, overrides)
    study = existing_study(sweep, results, storage)
    if study is None:
        return 1
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print(f"{sweep.name}: no completed trial yet", file=sys.stderr)
        return 1
    trial = study.best_trial
    print(f"best {sweep.metric} ({sweep.reduce}, {sweep.direction}): {trial.value:.6g} "
          f"(trial {trial.number}, run {trial.user_attrs.get('run_id')})")
    for key, value in trial.params.items():
        print(f"  {key}: {value}")
    if export:
        cfg = trial_config(sweep, trial.params)
        base = cfg.model_dump()
        for key in ("experiment", "variant"):
            base.pop(key)
        spec = {"name": Path(export).stem,
                "description": f"Best trial {trial.number} of sweep {sweep.name} "
                               f"({sweep.metric}={trial.value:.6g}) re-run over seeds.",
                "base": base, "grid": {"seed": list(seeds)}}
        io.write_text(export, yaml.safe_dump(spec, sort_keys=False))
        print(f"wrote {export}")
    return 0
