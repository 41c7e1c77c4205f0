"""Pipelined training: final test accuracy vs number of pipeline stages S, one line per
optimizer and stage profile — per-stage delays 2(S-1-s) (solid) next to every stage at the
first stage's delay 2(S-1) (``flat``, dashed) and per-stage without weight stashing (dotted). Mean ± std over seeds, every seed as a dot."""

import matplotlib.pyplot as plt
import numpy as np

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if table.empty or "delay.stages" not in table or table["delay.stages"].isna().all():
        common.skip("accuracy_vs_stages", "no pipeline runs")
    common.skip_sweeps("accuracy_vs_stages", table)
    table = table[table["delay.kind"] == "pipeline"].copy()
    table["stages"] = table["delay.stages"].astype(int)
    table["diverged"] = table["status"] == "diverged"
    metric = common.Metric(table)  # test accuracy, or a language model's test loss
    table["acc"] = table[metric.test].where(~table["diverged"])
    series = common.add_series(table, axes=("delay.stages",))
    summary = (table.groupby(["series", "optim.name", "stages"])
               .agg(mean=("acc", "mean"), std=("acc", "std"), seeds=("acc", "count"),
                    diverged=("diverged", "sum"), runs=("run_id", "count")).reset_index())
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    bottom, _ = common.accuracy_axis(ax, list(table["acc"]) + list(summary["mean"] + summary["std"].fillna(0)), table)
    for name, style in common.styles(series).items():
        rows = summary[summary["series"] == name].sort_values("stages")
        if "2(S-1" in name:  # the profiles (common.describe): per-stage solid, flat dashed,
            # per-stage without weight stashing dotted
            style = {**style, "ls": "--" if "flat delay" in name else ":" if "unstashed" in name else "-"}
        label = name
        ax.errorbar(rows["stages"], rows["mean"], yerr=rows["std"].fillna(0), **style, marker="o",
                    capsize=3, lw=1.6, label=label)
        runs = table[table["series"] == name]
        ax.scatter(runs["stages"] * 1.03, runs["acc"], color=style["color"], s=10, alpha=0.5, zorder=3)
        div = runs[runs["diverged"]]
        if len(div):
            ax.scatter(div["stages"], np.full(len(div), bottom), clip_on=False, color=style["color"], marker="x", s=50, zorder=4)
    ticks = sorted(table["stages"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("pipeline stages S (first stage's delay 2(S-1))")
    ax.set_ylabel(f"final test {metric.name}")
    ax.set_title(f"Accuracy vs pipeline depth\n({common.bn_prefix(table)}line = mean, dots = seeds;\n{common.ERRORBARS})", fontsize=10)
    ax.grid(alpha=0.3)
    common.legend(ax)
    common.save(fig, summary, args.out, "accuracy_vs_stages")


if __name__ == "__main__":
    main()
