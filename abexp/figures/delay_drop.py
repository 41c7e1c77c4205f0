"""The paper's claim in one table: the accuracy lost from D = 0 to a large delay, per optimizer.

For each optimizer and seed, drop = acc(D = 0) - acc(D = D_max) (the same seed at both ends,
so a seed's luck cancels); reported as mean ± sd over seeds, next to both accuracies. Also the
accuracy with BN running statistics at D_max where the runs recorded it (eval.bn: recalibrate
runs report test_acc_running_bn at their last epoch), to show what recalibration recovered.
A diverged run counts as accuracy 0 (it has none), so its drop is the whole D = 0 accuracy.
A language model's runs (common.Metric) are judged by test loss instead: drop = loss(D_max) -
loss(D = 0), the loss the delay added (a diverged run: infinite loss).
"""

import pandas as pd

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--delay", type=int, help="the large delay (default: the largest in the table)")
    args = p.parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    # one delay for the whole network only (a pipeline's S = 1 stands in for a missing D = 0)
    table = next((view for axis, view in common.delay_views(table) if axis is common.CONSTANT_AXIS), table.iloc[0:0])
    if table.empty:
        common.skip("delay_drop", "no finished runs")
    common.skip_sweeps("delay_drop", table)
    d_max = args.delay if args.delay is not None else int(table["delay.steps"].max())
    metric = common.Metric(table)
    table["acc"] = metric.scores(table)
    harm = metric.harm  # a drop is positive when the delay made it worse
    series = common.add_series(table)
    rows = []
    for name in series:
        runs = table[table["series"] == name]
        at = {d: runs[runs["delay.steps"] == d].set_index("seed") for d in (0, d_max)}
        seeds = sorted(set(at[0].index) & set(at[d_max].index))
        if not seeds:
            continue
        drop = pd.Series([harm * (at[0].loc[s, "acc"] - at[d_max].loc[s, "acc"]) for s in seeds])
        row = {"series": name, "seeds": len(seeds), "D": d_max,
               "acc_D0": at[0].loc[seeds, "acc"].mean(), "acc_Dmax": at[d_max].loc[seeds, "acc"].mean(),
               "drop_mean": drop.mean(), "drop_sd": drop.std(ddof=1) if len(seeds) > 1 else float("nan")}
        if "test_acc_running_bn" in runs:
            row["acc_Dmax_running_bn"] = at[d_max].loc[seeds, "test_acc_running_bn"].mean()
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        common.skip("delay_drop", f"no series has the same seed at D = 0 and D = {d_max}")
    seeds = int(out["seeds"].max())
    word = "loss" if metric.lower else "acc"
    what = "rise" if metric.lower else "drop"
    lines = [f"| optimizer | {word} D=0 | {word} D={d_max} | {what} (mean ± sd, {seeds} seed{'s' if seeds > 1 else ''}) |",
             "|---|---|---|---|"]
    sd = lambda v: f" ± {v:.4f}" if v == v else " (one seed)"  # noqa: E731
    lines += [f"| {r.series} | {r.acc_D0:.4f} | {r.acc_Dmax:.4f} | {r.drop_mean:.4f}{sd(r.drop_sd)} |"
              for r in out.itertuples()]
    print("\n".join(lines))
    from pathlib import Path
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    out.to_csv(folder / "delay_drop.csv", index=False)
    (folder / "delay_drop.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / 'delay_drop'}.csv/.md")


if __name__ == "__main__":
    main()
