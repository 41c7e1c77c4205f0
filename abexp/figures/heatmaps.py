"""lr x momentum heatmaps of the final test metric: one figure per optimizer, one panel per delay.

Accuracy on a fixed 0..1 scale; a language model's test loss (common.Metric) on the range of the
finite losses shown, the colour map reversed so that better is the same colour in both, and a
diverged cell (infinite loss) blank, marked "div"."""

import matplotlib.pyplot as plt
import numpy as np

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if table.empty or table["optim.lr"].nunique() < 2 or table["optim.momentum"].nunique() < 2:
        common.skip("heatmaps", "needs runs over at least 2 learning rates and 2 momenta")
    common.skip_sweeps("heatmaps", table)
    metric = common.Metric(table)
    table["acc"] = metric.scores(table)
    series = common.add_series(table, axes=("delay.steps", "optim.lr", "optim.momentum"))
    grid = (table.groupby(["series", "delay.steps", "optim.lr", "optim.momentum"])["acc"]
            .mean().reset_index())
    spans = grid.groupby("series")[["optim.lr", "optim.momentum"]].nunique()
    shown = {name: optim for name, optim in series.items() if (spans.loc[name] >= 2).all()}
    finite = grid["acc"][np.isfinite(grid["acc"])]
    vmin, vmax = (finite.min(), finite.max()) if metric.lower and len(finite) else (0.0, 1.0)
    cmap = "viridis_r" if metric.lower else "viridis"
    for n, (name, optim) in enumerate(shown.items()):
        rows = grid[grid["series"] == name]
        delays = sorted(rows["delay.steps"].unique())
        fig, axes = plt.subplots(1, len(delays), figsize=(3.4 * len(delays), 3.2), squeeze=False)
        lrs, moms = sorted(rows["optim.lr"].unique()), sorted(rows["optim.momentum"].unique())
        for ax, d in zip(axes[0], delays):
            sub = rows[rows["delay.steps"] == d].pivot(index="optim.momentum", columns="optim.lr",
                                                       values="acc").reindex(index=moms, columns=lrs)
            values = np.where(np.isfinite(sub.values), sub.values, np.nan)
            im = ax.imshow(values, origin="lower", vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
            for (i, k), v in np.ndenumerate(sub.values):
                if np.isinf(v):
                    ax.text(k, i, "div", ha="center", va="center", fontsize=7, color="k")
                elif not np.isnan(v):
                    shade = (v - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                    dark = shade > 0.4 if metric.lower else shade < 0.6
                    ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="w" if dark else "k")
            ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], rotation=45)
            ax.set_yticks(range(len(moms)), [f"{v:g}" for v in moms])
            ax.set_xlabel("learning rate")
            ax.set_title(f"D = {d}")
        axes[0, 0].set_ylabel("momentum")
        fig.colorbar(im, ax=axes[0].tolist(), label=metric.axis_label)
        fig.suptitle(f"{name}: {'test loss' if metric.lower else 'accuracy'} over lr x momentum", fontsize=11)
        common.save(fig, rows, args.out, f"heatmap_{optim}" if list(shown.values()).count(optim) == 1
                    else f"heatmap_{optim}_{n}")


if __name__ == "__main__":
    main()
