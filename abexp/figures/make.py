"""``abexp figures``: every figure from a results folder alone (no training).

Collects ``RESULTS/runs`` into ``runs.csv`` and ``epochs.csv``, draws each experiment's figures
into ``RESULTS/figures/<experiment>/``, an Optuna sweep's own figures for each study in
``RESULTS/sweeps/``, and the quadratic stability figures. The stability tables are bisections
(minutes of CPU) that do not depend on the runs, so they are computed only when asked for
(``--stability``, which ``make figures`` passes when one is missing) and then kept
(``RESULTS/stability.csv``, ``RESULTS/pipeline_stability.csv``); a run over every experiment
draws the kept ones and says in a line which are missing, so it takes seconds.

Scripts run in this one process; one that has nothing to draw says so in a line, and one that
fails says so in a line too, and the rest still run (the exit code is then 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

STABILITY_DELAYS = [0, 1, 2, 4, 8, 16, 32]
STABILITY_OPTIMS = ["sgdm", "ab", "sc", "lwp"]
STABILITY_STAGES = [1, 2, 4, 8, 16]


def __getattr__(name: str):
    if name == "RUN_SCRIPTS":  # the figures of every experiment: abexp.registry.FIGURES
        return run_scripts()
    raise AttributeError(name)


def run_scripts() -> list[str]:
    """The figures drawn for each experiment: the registered ones (abexp.figures.catalog, plugins)."""
    from abexp.registry import FIGURES
    return FIGURES.names()


def script(name: str, *argv: str) -> bool:
    """Run one figure script's ``main`` here; False when it failed (said in one line)."""
    from abexp.figures.common import Skipped
    from abexp.registry import FIGURES

    record = FIGURES.find(name)
    try:
        importlib.import_module(record.module if record else f"abexp.figures.{name}").main(list(argv))
    except Skipped:
        pass
    except Exception as err:  # noqa: BLE001 -- one broken figure must not stop the others
        print(f"failed {name}: {type(err).__name__}: {err}", file=sys.stderr)
        return False
    return True


def stability_tables(res: Path, compute: bool) -> bool:
    """The quadratic tables, (re)computed when asked, drawn when present; True when all drew.
    Without ``compute`` a missing table is one line, not minutes of bisections."""
    import pandas as pd

    from abexp.lab.collect import write_table
    from abexp.sim.stability import pipeline_table, stability_table

    ok = True
    for name, table_fn, figure in (
            ("stability", lambda: stability_table(STABILITY_OPTIMS, STABILITY_DELAYS), "stability"),
            ("pipeline_stability", lambda: pipeline_table(STABILITY_OPTIMS, STABILITY_STAGES), "pipeline_stability")):
        path = res / f"{name}.csv"
        if compute:
            print(f"computing {path} (quadratic bisections; kept for later runs)", flush=True)
            write_table(pd.DataFrame(table_fn()), path)
        elif not path.exists():
            print(f"skipped {figure}: no {path} (abexp figures --stability computes it: "
                  "quadratic bisections, minutes of CPU)")
            continue
        ok &= script(figure, "--table", str(path), "--out", str(res / "figures"))
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="abexp figures", description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--experiment", action="append", help="only these experiments or sweeps (repeatable)")
    p.add_argument("--spec", action="append", default=[],
                   help="the runs of this spec, whichever spec trained them (repeatable): runs shared "
                        "by several specs carry the label of the one that trained them first")
    p.add_argument("--stability", action="store_true",
                   help="(re)compute and draw the quadratic stability tables (minutes of CPU; "
                        "without it, kept tables are drawn and missing ones skipped)")
    p.add_argument("--baseline", action="append",
                   help="the optimizer the paired table (paired.md) compares every other with (default sgdm), "
                        "or a series by its label; repeated, one per optimizer: each optimizer's series "
                        "against its own (an ablation study)")
    args = p.parse_args(argv)
    args.baseline = args.baseline or ["sgdm"]
    import pandas as pd

    from abexp.lab.collect import collect, collect_epochs, write_table
    from abexp.lab.preflight import path_component

    res = Path(args.results)
    if not res.is_dir():
        print(f"abexp figures: --results: {res} is not a folder", file=sys.stderr)
        return 2
    damaged: list[str] = []
    table = collect(res, damaged=damaged)
    runs, epochs = res / "runs.csv", res / "epochs.csv"
    write_table(table, runs)
    write_table(collect_epochs(res, table), epochs)
    print(f"collected {len(table)} runs into {runs}", flush=True)
    ok = True
    if args.stability or not (args.experiment or args.spec):
        ok &= stability_tables(res, args.stability)
    names = {n for n in table.get("experiment", pd.Series(dtype=str)).dropna() if n}  # "": abexp train
    for spec_path in args.spec:
        ok &= spec_figures(spec_path, table, res, args.baseline)
    if args.spec and not args.experiment:
        return 0 if ok and not damaged else 1
    experiments = args.experiment or sorted(names)
    sweeps = sweep_studies(res)
    for exp in experiments:
        out = str(res / "figures" / path_component(exp))  # never a path: --experiment ../x stays inside
        if exp in sweeps:
            from abexp.figures.common import Skipped
            from abexp.figures.sweep import draw
            try:
                draw(sweeps[exp], out)
            except Skipped:
                pass
            except Exception as err:  # noqa: BLE001 -- as script(): one line, the rest still run
                print(f"failed sweep {exp}: {type(err).__name__}: {err}", file=sys.stderr)
                ok = False
            print(f"skipped the delay figures of {exp}: a sweep's trials (its figures are sweep_*.png)")
            continue
        if exp not in names:
            print(f"skipped {exp}: no runs of that experiment in {runs}")
            continue
        for name in run_scripts():
            ok &= script(name, "--table", str(runs), "--experiment", exp, "--out", out, *extra_args(name, args))
        for per_epoch in ("training_curves", "brake"):  # figures of the per-epoch table
            ok &= script(per_epoch, "--table", str(epochs), "--experiment", exp, "--out", out)
    if damaged:
        print(f"abexp figures: {len(damaged)} damaged run folder(s) skipped; the figures omit them", file=sys.stderr)
    return 0 if ok and not damaged else 1


def extra_args(name: str, args: argparse.Namespace) -> list[str]:
    """Options of ``abexp figures`` that one script takes: the paired table's baseline."""
    from abexp.figures.paired import baseline_argv
    return baseline_argv(args.baseline) if name == "paired" else []


def spec_figures(spec_path: str, table, res: Path, baseline: Sequence[str] = ("sgdm",)) -> bool:
    """Figures of exactly a spec's runs (selected by run id, labelled with the spec's name) into
    RESULTS/figures/<spec name>/, from a table of their own (runs.csv there)."""
    from abexp.lab.collect import collect_epochs, write_table
    from abexp.lab.spec import load_spec

    spec = load_spec(spec_path)
    ids = {run.run_id for run in spec.expand(warn=lambda m: None)}
    mine = table[table["run_id"].isin(ids)].copy() if len(table) else table
    out = res / "figures" / spec.name
    print(f"{spec.name}: {len(mine)} of its {len(ids)} runs found", flush=True)
    if mine.empty:
        return True
    mine["experiment"] = spec.name
    out.mkdir(parents=True, exist_ok=True)
    write_table(mine, out / "runs.csv")
    curves = collect_epochs(res, mine)
    write_table(curves, out / "epochs.csv")
    ok = True
    for name in run_scripts():
        ok &= script(name, "--table", str(out / "runs.csv"), "--out", str(out),
                     *extra_args(name, argparse.Namespace(baseline=baseline)))
    return ok & script("training_curves", "--table", str(out / "epochs.csv"), "--out", str(out))


def sweep_studies(res: Path) -> dict:
    """{study name: study} for every journal in RESULTS/sweeps (a sweep's trials are runs whose
    experiment is the study's name)."""
    folder = res / "sweeps"
    if not folder.is_dir():
        return {}
    import optuna

    from abexp.figures.sweep import studies
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    found = {}
    for journal in sorted(folder.glob("*.journal")):
        try:
            found.update({s.study_name: s for s in studies(str(journal))})
        except Exception as err:  # noqa: BLE001 -- an unreadable journal costs its own figures only
            print(f"failed to read {journal}: {type(err).__name__}: {err}", file=sys.stderr)
    return found


if __name__ == "__main__":
    sys.exit(main())
