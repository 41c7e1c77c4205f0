"""lr x momentum heatmaps of final test accuracy: one figure per optimizer, one panel per delay."""

import matplotlib.pyplot as plt
import numpy as np

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if table.empty or table["optim.lr"].nunique() < 2 or table["optim.momentum"].nunique() < 2:
        common.skip("heatmaps", "needs runs over at least 2 learning rates and 2 momenta")
    common.skip_sweeps("heatmaps", table)
    table["acc"] = table["test_acc"].where(table["status"] == "completed", 0.0)
    series = common.add_series(table, axes=("delay.steps", "optim.lr", "optim.momentum"))
    grid = (table.groupby(["series", "delay.steps", "optim.lr", "optim.momentum"])["acc"]
            .mean().reset_index())
    spans = grid.groupby("series")[["optim.lr", "optim.momentum"]].nunique()
    shown = {name: optim for name, optim in series.items() if (spans.loc[name] >= 2).all()}
    for n, (name, optim) in enumerate(shown.items()):
        rows = grid[grid["series"] == name]
        delays = sorted(rows["delay.steps"].unique())
        fig, axes = plt.subplots(1, len(delays), figsize=(3.4 * len(delays), 3.2), squeeze=False)
        lrs, moms = sorted(rows["optim.lr"].unique()), sorted(rows["optim.momentum"].unique())
        for ax, d in zip(axes[0], delays):
            sub = rows[rows["delay.steps"] == d].pivot(index="optim.momentum", columns="optim.lr",
                                                       values="acc").reindex(index=moms, columns=lrs)
            im = ax.imshow(sub.values, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (i, k), v in np.ndenumerate(sub.values):
                if not np.isnan(v):
                    ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="w" if v < 0.6 else "k")
            ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], rotation=45)
            ax.set_yticks(range(len(moms)), [f"{v:g}" for v in moms])
            ax.set_xlabel("learning rate")
            ax.set_title(f"D = {d}")
        axes[0, 0].set_ylabel("momentum")
        fig.colorbar(im, ax=axes[0].tolist(), label="final test accuracy (diverged = 0)")
        fig.suptitle(f"{name}: accuracy over lr x momentum", fontsize=11)
        common.save(fig, rows, args.out, f"heatmap_{optim}" if list(shown.values()).count(optim) == 1
                    else f"heatmap_{optim}_{n}")


if __name__ == "__main__":
    main()
