"""The paper's headline: final test accuracy vs delay, one line per optimizer.

Mean ± std over seeds, every seed as a dot; diverged runs as crosses at the bottom; the
undelayed SGDM accuracy as a reference line (one per SGDM series); the y-range fitted to the
data, with the chance level dotted.
"""

import matplotlib.pyplot as plt
import numpy as np

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if "delay.kind" in table:
        table = table[~table["delay.kind"].isin(["pipeline", "async", "trace"])]  # stages, async and replays: their own figures
    if table.empty:
        common.skip("accuracy_vs_delay", "no finished runs with one delay for the whole network")
    common.skip_sweeps("accuracy_vs_delay", table)
    table["diverged"] = table["status"] == "diverged"
    metric = common.Metric(table)  # test accuracy, or a language model's test loss
    table["acc"] = table[metric.test].where(~table["diverged"])
    series = common.add_series(table)
    summary = (table.groupby(["series", "optim.name", "delay.steps"])
               .agg(mean=("acc", "mean"), std=("acc", "std"), seeds=("acc", "count"),
                    diverged=("diverged", "sum"), runs=("run_id", "count"))
               .reset_index())
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    bottom, _ = common.accuracy_axis(ax, list(table["acc"]) + list(summary["mean"] + summary["std"].fillna(0))
                                     + list(summary["mean"] - summary["std"].fillna(0)), table)
    for name, style in common.styles(series).items():
        rows = summary[summary["series"] == name].sort_values("delay.steps")
        c = style["color"]
        ok = rows["seeds"] > 0
        ax.errorbar(rows["delay.steps"][ok], rows["mean"][ok], yerr=rows["std"][ok].fillna(0),
                    **style, marker="o", capsize=3, label=name, lw=1.8)
        runs = table[table["series"] == name]
        jitter = np.where(runs["delay.steps"] > 0, runs["delay.steps"] * 0.04, 0.04)
        ax.scatter(runs["delay.steps"] + jitter, runs["acc"], color=c, s=12, alpha=0.5, zorder=3)
        div = runs[runs["diverged"]]
        if len(div):
            ax.scatter(div["delay.steps"], np.full(len(div), bottom), color=c, marker="x", s=50, zorder=4,
                       clip_on=False, label=f"{name} diverged")
    common.undelayed_references(ax, table, series)
    common.log2_delay_axis(ax, summary["delay.steps"])
    ax.set_ylabel(f"final test {metric.name}")
    ax.set_title(f"Accuracy vs gradient delay\n({common.bn_prefix(table)}line = mean, dots = seeds;\n{common.ERRORBARS})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    common.legend(ax)
    common.save(fig, summary, args.out, "accuracy_vs_delay")


if __name__ == "__main__":
    main()
