"""One summary row per finished run of a long study, small enough to commit as the runs finish.

A study such as experiments/fashion_mnist_evidence.yaml takes many sessions on a 2-core machine,
and a machine may not survive to the next one: its results folder is not committed, so each
finished run's row is (this file's output, under results/), with what the tables need to be
redrawn from the rows alone (analysis/study_tables.py). Rows already in the output file are
kept as they are (a run is never re-summarised on another machine or with other code), new
finished runs are appended with the code commit and CPU kind that made them:

    python analysis/study_rows.py --results /work/study/evidence --code c444401 \
        -o results/fashion_mnist_evidence_runs.csv

A language model's runs (experiments/shakespeare_gpt.yaml) get LM_COLUMNS: losses, not accuracies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_readme import cpu_kind  # noqa: E402  (the CPU kind, as the demo check names it)

from abexp import io  # noqa: E402
from abexp.config import ADDED_KEYS  # noqa: E402
from abexp.lab.elsewhere import FINISHED  # noqa: E402  (a diverged run is a result, the worst, not a gap)
from abexp.figures.common import Metric  # noqa: E402
from abexp.lab.collect import collect, collect_epochs  # noqa: E402

COLUMNS = ["run_id", "experiment", "status", "seed", "optim.name", "optim.lr", "delay.kind", "delay.stages",
           "delay.steps", "data.val_split", "steps", "val_acc", "test_acc", "wall_s",
           # the keys an ablation varies (fashion_mnist_evidence_{ablations,dcasgd}.yaml): its arms are separate series
           "optim.rho", "optim.ab_cosine", "optim.lwp_lookahead", "optim.dc_lambda", "optim.dc_adaptive",
           # SGDM given AB's mean brake as its lr schedule (fashion_mnist_evidence_brake_schedule.yaml)
           "schedule.epoch_factors"]
# per epoch, for the brake table (abexp.figures.brake): joined with the run rows by run_id to draw
EPOCH_COLUMNS = ["run_id", "epoch", "brake_mean", "brake_sd"]
# a language model (abexp.figures.common.Metric): losses in nats per character, and the pipeline
# variant's stages beside the constant delay; data.name tells the figures that lower is better
LM_COLUMNS = ["run_id", "experiment", "variant", "status", "data.name", "seed", "optim.name", "optim.lr",
              "delay.kind", "delay.stages", "delay.steps", "steps", "val_loss", "test_loss", "wall_s"]


def new_rows(results: str, known: set[str], code: str, cpu: str) -> pd.DataFrame:
    """The finished runs of ``results`` not in ``known``, with where they were made."""
    table = collect(results)
    if table.empty:
        return pd.DataFrame(columns=COLUMNS + ["code", "cpu"])
    columns = LM_COLUMNS if Metric(table).lower else COLUMNS
    done = table[table["status"].isin(FINISHED) & ~table["run_id"].isin(known)]
    rows = done.reindex(columns=columns).copy()
    rows["steps"] = rows["steps"].astype("Int64")
    rows["code"], rows["cpu"] = code, cpu
    return rows


def new_epochs(results: str, run_ids: set[str]) -> pd.DataFrame:
    """The per-epoch brake of the runs ``run_ids`` that logged one (AB rules), EPOCH_COLUMNS."""
    table = collect(results)
    if table.empty:
        return pd.DataFrame(columns=EPOCH_COLUMNS)
    epochs = collect_epochs(results, table[table["run_id"].isin(run_ids)])
    if "brake_mean" not in epochs:
        return pd.DataFrame(columns=EPOCH_COLUMNS)
    return epochs[epochs["brake_mean"].notna()].reindex(columns=EPOCH_COLUMNS)


def backfill(old: pd.DataFrame, results: str) -> pd.DataFrame:
    """Rows written before some of today's columns existed (status, data.name, delay.kind,
    delay.stages) gain them: status "completed" (only completed runs were written then), the
    others from the rows' own runs in ``results``, which must all be there."""
    old = old.copy()
    if "status" not in old:
        old["status"] = "completed"
    columns = LM_COLUMNS if "test_loss" in old and "test_acc" not in old else COLUMNS
    missing = [c for c in columns if c not in old]
    if missing:
        runs = collect(results)
        absent = set(old["run_id"]) - set(runs.get("run_id", ()))
        if absent:
            sys.exit(f"{results}: {len(absent)} of the old rows' runs are not here to fill in their "
                     f"{', '.join(missing)} from (the study's results folder?)")
        runs = runs.set_index("run_id")
        for column in missing:  # a column no run has (val_acc without a validation set) stays empty
            old[column] = old["run_id"].map(runs[column]) if column in runs else float("nan")
    return old


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="the study's results folder")
    parser.add_argument("--code", required=True, help="the commit whose code trained the new runs")
    parser.add_argument("-o", "--output", required=True, help="the CSV to extend")
    parser.add_argument("--epochs", help="also extend this CSV with the new runs' per-epoch brake (EPOCH_COLUMNS); "
                                         "a run whose rows are already there is not added again")
    args = parser.parse_args(argv)
    out = Path(args.output)
    old = pd.read_csv(out, dtype={"run_id": str}) if out.exists() else None
    known = set(old["run_id"]) if old is not None else set()
    model, isa = cpu_kind()
    rows = new_rows(args.results, known, args.code, f"{model} ({isa})")
    if old is not None:
        old = backfill(old, args.results)
    table = rows if old is None else old if rows.empty else pd.concat([old, rows], ignore_index=True)
    for key, neutral in ADDED_KEYS.items():  # a run from before the key existed ran at its neutral value
        if key in table and neutral is not None:  # (a column of only blanks reads as floats: set, not filled)
            table[key] = neutral if table[key].isna().all() else table[key].fillna(neutral)
    columns = LM_COLUMNS if "test_acc" not in table else COLUMNS
    known_order = [c for c in columns + ["code", "cpu"] if c in table]
    table = table[list(dict.fromkeys(known_order + list(table.columns)))]  # backfilled columns in place
    order = [c for c in ("variant", "delay.stages", "delay.steps", "optim.name", "optim.lr", "seed") if c in table]
    table = table.sort_values(order, kind="stable")
    if args.epochs:  # before the rows: a run in the rows file has its epochs written
        epochs_out = Path(args.epochs)
        old_epochs = pd.read_csv(epochs_out, dtype={"run_id": str}) if epochs_out.exists() else None
        have = set(old_epochs["run_id"]) if old_epochs is not None else set()
        added = new_epochs(args.results, set(table["run_id"]) - have)
        epochs = added if old_epochs is None else pd.concat([old_epochs, added], ignore_index=True)
        epochs = epochs.sort_values(["run_id", "epoch"], kind="stable")
        io.write_text(epochs_out, epochs.to_csv(index=False))
        print(f"{epochs_out}: {len(added)} new, {len(epochs)} rows")
    io.write_text(out, table.to_csv(index=False))
    print(f"{out}: {len(rows)} new, {len(table)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
