"""Every optimizer at its own best learning rate, per delay: the fair comparison of mitigations.

A spec that gives each optimizer the same lr grid at a delay (experiments/fashion_mnist_mitigations.yaml)
is read here as a reviewer would: for each optimizer and delay, the lr whose mean test accuracy
over seeds is highest is that optimizer's tuned lr *at that delay*; the cell reports the mean ±
sd over seeds at it, the lr, and a mark when the best lr sits on the edge of the lrs compared
(they did not bracket the optimum). A diverged run counts as accuracy 0. When every finished run
held out a validation set (data.val_split), the lr is selected on the mean *validation* accuracy
and the cell reports *test* accuracy at it; otherwise the same test set selects the lr and reports
it (an optimistic bias, the same for every optimizer), and the table says which. The per-lr table
below the tuned one shows every cell, so nothing rests on the selection alone. The lrs compete on
the seeds most of the cell's lrs were run with (``selection_seeds``): a half-finished lr waits, and
in a two-stage study (abexp confirm) the first stage's seeds select and the selected lr's cell
reports all its seeds; the count of lrs compared shows when short.
Pipeline runs (delay.kind pipeline) get tables of their own against the stage count S
(tuned_lr_stages.md/.csv/.png; common.delay_views), next to the constant delays' D.
"""

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from abexp.figures import common


def selects_on_validation(table: pd.DataFrame, column: str = "val_acc") -> bool:
    """Whether every finished run has a validation metric (then it, not test, selects the lr)."""
    done = table[table["status"] == "completed"]
    return column in table and len(done) > 0 and bool(done[column].notna().all())


def per_lr(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and seed count of every (series, delay, lr) cell, with the per-seed accuracies
    (``acc``: test, reported) and, where the table has it, the mean of ``sel`` (validation
    accuracy, what selects the lr) as ``val_mean`` and its sd over seeds as ``val_sd``."""
    rows = []
    for (name, delay, lr), runs in table.groupby(["series", "delay.steps", "optim.lr"]):
        runs = runs.sort_values("seed")
        accs = runs["acc"]
        row = {"series": name, "delay": int(delay), "lr": float(lr), "seeds": len(accs),
               "mean": accs.mean(), "sd": accs.std(ddof=1) if len(accs) > 1 else float("nan"),
               "accs": " ".join(repr(float(a)) for a in accs),  # full precision: selection and pairing read it
               "seed_list": " ".join(str(int(s)) for s in runs["seed"])}
        if "sel" in runs:
            row["val_mean"] = runs["sel"].mean()
            row["val_sd"] = runs["sel"].std(ddof=1) if len(runs) > 1 else float("nan")
            row["vals"] = " ".join(repr(float(v)) for v in runs["sel"])
        rows.append(row)
    return pd.DataFrame(rows)


def selection_seeds(lrs: pd.DataFrame) -> frozenset[int]:
    """The seeds a cell's lrs compete on: the seed set most of its lrs were run with (ties: the
    larger set). In a study run in two stages — every lr on a few seeds, then more seeds at the
    lr those selected (abexp confirm) — that is the first stage's seeds, so the lr is chosen as
    the first stage chose it and reported over all its seeds; an lr still missing one of those
    seeds (half-finished) waits."""
    sets = [frozenset(int(s) for s in str(seeds).split()) for seeds in lrs["seed_list"]]
    return max(set(sets), key=lambda seeds: (sets.count(seeds), len(seeds), sorted(seeds)))


def best(cells: pd.DataFrame, metric: common.Metric | None = None) -> pd.DataFrame:
    """One row per (series, delay): the lr with the best mean validation accuracy (the test
    accuracy when the cells have no validation; a loss: the lowest) over the cell's selection
    seeds (``selection_seeds``; ties: the smaller lr), among the lrs run on all of them, with
    its mean over all its seeds; whether it is an edge of the lrs compared, how many competed,
    and how many the delay's grid has (every lr any optimizer was run at at that delay)."""
    grid_at = cells.groupby("delay")["lr"].nunique()
    column = "vals" if "vals" in cells else "accs"
    rows = []
    for (name, delay), lrs in cells.groupby(["series", "delay"], sort=False):
        chosen_seeds = selection_seeds(lrs)
        scores = []
        for lr in lrs.to_dict("records"):
            per_seed = dict(zip((int(s) for s in str(lr["seed_list"]).split()),
                                (float(v) for v in str(lr[column]).split())))
            worst = metric.diverged if metric else 0.0  # a missing value counts as a diverged run
            scores.append(sum(worst if per_seed[s] != per_seed[s] else per_seed[s] for s in chosen_seeds)
                          / len(chosen_seeds) if chosen_seeds <= set(per_seed) else None)
        full = lrs.assign(selection_score=scores)
        full = full[full["selection_score"].notna()].sort_values("lr")
        if full.empty:
            continue
        top = full.loc[metric.better(full["selection_score"]) if metric else full["selection_score"].idxmax()]
        # an edge of the lrs that competed: those did not bracket the optimum
        edge = "" if len(full) < 2 else "low" if top["lr"] == full["lr"].min() else "high" if top["lr"] == full["lr"].max() else ""
        rows.append({**top.to_dict(), "selection_seeds": " ".join(map(str, sorted(chosen_seeds))),
                     "lrs_compared": len(full), "lrs_in_grid": int(grid_at[delay]), "edge": edge})
    return pd.DataFrame(rows)


def grid_text(cells: pd.DataFrame, letter: str = "D") -> str:
    """The lr grid in words: one set, or one per group of delays that shared a grid."""
    def braces(lrs) -> str:
        return "{" + ", ".join(f"{g:g}" for g in lrs) + "}"
    grids = {delay: tuple(sorted(lrs.unique())) for delay, lrs in cells.groupby("delay")["lr"]}
    if len(set(grids.values())) == 1:
        return f"the grid {braces(next(iter(grids.values())))}"
    by_grid: dict[tuple, list[int]] = {}
    for delay, lrs in grids.items():
        by_grid.setdefault(lrs, []).append(delay)
    return "the grid " + " and ".join(f"{braces(lrs)} at {letter} = {', '.join(map(str, ds))}" for lrs, ds in by_grid.items())


def cell_text(row) -> str:
    text = f"{row['mean']:.3f}" + (f" ± {row['sd']:.3f}" if row["seeds"] > 1 else " (1 seed)")
    mark = {"low": "↓", "high": "↑"}.get(row["edge"], "")
    short = f", {row['lrs_compared']} of {row['lrs_in_grid']} lrs" if row["lrs_compared"] < row["lrs_in_grid"] else ""
    return f"{text} @ {row['lr']:g}{mark}{short}"


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if table.empty or "optim.lr" not in table:
        common.skip("tuned_lr", "no finished runs")
    common.skip_sweeps("tuned_lr", table)
    common.per_view("tuned_lr", table, lambda view, axis: report(view, axis, args.out))


def report(table: pd.DataFrame, axis: common.DelayAxis, out_dir: str) -> None:
    """The tuned table, every-lr table and figure of one delay axis (D, or S for pipelines)."""
    stem = f"tuned_lr{axis.suffix}"
    D = axis.letter
    metric = common.Metric(table)  # accuracy, or a language model's loss (lower is better)
    table["acc"] = metric.scores(table)
    on_val = selects_on_validation(table, metric.val)
    if on_val:
        table["sel"] = metric.scores(table, metric.val)
    series = common.add_series(table, axes=("delay.steps", "optim.lr"))
    cells = per_lr(table)
    if cells.groupby(["series", "delay"])["lr"].nunique().max() < 2:
        common.skip(stem, "no optimizer was run at 2 or more learning rates at one delay")
    grid = sorted(cells["lr"].unique())
    rank = {name: i for i, name in enumerate(series)}
    cells = cells.sort_values(["delay", "lr"]).sort_values("series", key=lambda s: s.map(rank), kind="stable")
    tuned = best(cells, metric)
    delays = sorted(tuned["delay"].unique())
    text = {(r["series"], r["delay"]): cell_text(r) for r in tuned.to_dict("records")}
    seeds = int(cells["seeds"].max())
    note = f" ({common.bn_note(table)})" if common.bn_note(table) else ""
    what = metric.name
    chosen = (f"mean validation {what} (a validation set, not trained on), test reported"
              if on_val else f"mean test {what}, the same test set that is reported (no validation set)")
    lines = [f"Final test {what}{note}, mean ± sd over {seeds} seed{'s' * (seeds > 1)} at each "
             f"optimizer's best lr per {axis.word} from {grid_text(cells, D)} (chosen on the "
             f"{chosen}, over the seeds most of the cell's lrs were run with, among the lrs run on all of them; "
             f"↑/↓: the best is the top/bottom of the lrs compared). "
             f"A diverged run counts as {metric.diverged:g}.", "",
             "| optimizer | " + " | ".join(f"{D}={d}" for d in delays) + " |", "|---|" + "---|" * len(delays)]
    lines += [f"| {name} | " + " | ".join(text.get((name, d), "–") for d in delays) + " |"
              for name in series if any((name, d) in text for d in delays)]
    if any((name, d) not in text for name in series for d in delays):
        lines += ["", "–: no finished run: excluded by the spec (e.g. rules that are SGDM bitwise without delay) or not finished yet."]
    lines += ["", "Every lr (test: mean ± sd over seeds" + (f"; val: the mean (± sd) validation {what}, what selects"
              if on_val else "") + "; the tuned table picks one per cell):", "",
              "| optimizer | lr | " + " | ".join(f"{D}={d}" for d in delays) + " |", "|---|---|" + "---|" * len(delays)]
    every = {(r["series"], r["lr"], r["delay"]): r for r in cells.to_dict("records")}
    for name in series:
        for lr in grid:
            shown = [every.get((name, lr, d)) for d in delays]
            if any(shown):
                lines.append(f"| {name} | {lr:g} | " + " | ".join(
                    "–" if r is None else f"{r['mean']:.3f}" + (f" ± {r['sd']:.3f}" if r["seeds"] > 1 else "")
                    + (f" (val {r['val_mean']:.3f}" + (f" ± {r['val_sd']:.3f}" if r["seeds"] > 1 else "") + ")"
                       if on_val else "")
                    for r in shown) + " |")
    print("\n".join(lines))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    cells.to_csv(out / f"{stem}_every_lr.csv", index=False)
    tuned["selected_on"] = metric.val if on_val else metric.test  # tuned_lr.csv says what chose the lr
    draw(tuned, table, series, delays, out_dir, metric, axis)


def draw(tuned: pd.DataFrame, table: pd.DataFrame, series: dict[str, str], delays: list[int], out: str,
         metric: common.Metric | None = None, axis: common.DelayAxis = common.CONSTANT_AXIS) -> None:
    """One panel per delay: each optimizer's per-seed accuracies (dots) and mean (bar) at its
    tuned lr, optimizers top to bottom in the fixed order, the tuned undelayed SGDM as a line."""
    names = [n for n in series if n in set(tuned["series"])]
    fig, axes = plt.subplots(1, len(delays), figsize=(3.2 * len(delays) + 1.6, 0.32 * len(names) + 1.6),
                             sharey=True, squeeze=False, layout="constrained")
    styles = common.styles(series)
    first = common.ordered(set(series.values()))[0]  # the reference line: the first optimizer (SGDM, AdamW), undelayed
    reference = tuned[(tuned["delay"] == axis.undelayed) & (tuned["series"].map(series) == first)]
    shown = []
    for ax, delay in zip(axes[0], delays):
        rows = tuned[tuned["delay"] == delay].set_index("series")
        for y, name in enumerate(names):
            if name not in rows.index:
                continue
            row = rows.loc[name]
            accs = [float(a) for a in str(row["accs"]).split() if float(a) != float("inf")]
            ax.scatter([row["mean"]], [y], color=styles[name]["color"], marker="|", s=220, linewidths=2.2, zorder=3)
            ax.scatter(accs, [y] * len(accs), color=styles[name]["color"], s=14, alpha=0.6, zorder=4)
            shown += accs
        for _, ref in reference.iterrows():
            ax.axvline(ref["mean"], color="k", ls="--", lw=0.9,
                       label=f"{common.label(first)}, no delay ({ref['mean']:.3f})")
        ax.set_title(f"{axis.letter} = {delay}", fontsize=10)
        ax.grid(axis="x", color="0.9", lw=0.6)
        ax.set_xlabel(f"test {metric.name if metric else 'accuracy'} at the tuned lr"
                      + (" (lower is better)" if metric and metric.lower else ""))  # reported on test whichever split selected
    # the tuned cells' own range (not down to chance): tuned rules often differ by a point or two
    spread = max(shown) - min(shown)
    low = max(0.0, min(shown) - max(0.02, 0.1 * spread))
    high = max(shown) + max(0.02, 0.1 * spread)
    for ax in axes[0]:
        ax.set_xlim(low, high if metric and metric.lower else min(1.0, high))
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].set_ylim(len(names) - 0.5, -0.5)  # the first optimizer on top
    if len(reference):
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles[:1], labels[:1], fontsize=7, loc="outside lower center")
    note = f"{common.bn_note(table)}; " if common.bn_note(table) else ""
    chosen = "lr selected on validation, test shown" if tuned["selected_on"].str.startswith("val_").all() else \
        "lr selected on test"
    fig.suptitle(f"Each optimizer at its best lr per {axis.word} ({note}{chosen}; | = mean, dots = seeds, no error bars)", fontsize=10)
    common.save(fig, tuned, out, f"tuned_lr{axis.suffix}")


if __name__ == "__main__":
    main()
