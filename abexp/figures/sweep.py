"""An Optuna sweep's figures, with Optuna's own matplotlib views: the objective against each
swept parameter (``plot_slice``: a log axis where the space is log) and against trial number
(``plot_optimization_history``, with the best so far), plus the CSV of every finished trial.

Called by ``abexp figures`` for each study in ``results/sweeps/*.journal``, or alone with
``--storage`` (a journal file or a database URL) and ``--study``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import matplotlib.pyplot as plt

from abexp.figures import common
from abexp.lab.sweep_report import trials_frame


def draw(study, out: str | Path) -> list[str]:
    """The two figures and the trials CSV of ``study`` into ``out``; returns what was written."""
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ov

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        common.skip(f"sweep {study.study_name}", "no completed trial yet")
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = ov.plot_slice(study)
        fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        fig.set_size_inches(max(4.0, 3.6 * len(study.best_trial.params)), 3.6)
        fig.suptitle(f"{study.study_name}: objective against each swept parameter", fontsize=10)
        common.save(fig, trials_frame(study), str(out), "sweep_objective")
        written.append("sweep_objective")
        ax = ov.plot_optimization_history(study)
        ax.figure.set_size_inches(6.0, 3.8)
        ax.set_title(f"{study.study_name}: objective against trial number", fontsize=10)
        common.save(ax.figure, trials_frame(study), str(out), "sweep_history")
        written.append("sweep_history")
    plt.close("all")
    return written


def studies(storage_url: str):
    """Every study a storage holds (a journal file, or a database URL)."""
    import optuna

    from abexp.lab.sweep import make_storage

    storage = make_storage(storage_url)
    return [optuna.load_study(study_name=s.study_name, storage=storage)
            for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--storage", required=True, help="FILE.journal or a database URL")
    p.add_argument("--study", help="one study (default: every study the storage holds)")
    p.add_argument("--out", default="results/figures", help="folder; each study in a subfolder")
    args = p.parse_args(argv)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for study in studies(args.storage):
        if args.study in (None, study.study_name):
            try:
                draw(study, Path(args.out) / study.study_name)
            except common.Skipped:
                pass


if __name__ == "__main__":
    main()
