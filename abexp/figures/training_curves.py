"""Training curves at chosen delays: test accuracy and train loss vs epoch, per optimizer."""

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, table="results/epochs.csv")
    p.add_argument("--delays", type=int, nargs="*", help="delays to show (default: all, up to 4)")
    args = p.parse_args(argv)
    curves = common.load(args.table, args.experiment)
    if curves.empty:
        common.skip("training_curves", "no per-epoch metrics")
    common.skip_sweeps("training_curves", curves)
    delays = args.delays or sorted(curves["delay.steps"].unique())
    if len(delays) > 4:
        delays = [delays[0], delays[len(delays) // 3], delays[2 * len(delays) // 3], delays[-1]]
    curves = curves[curves["delay.steps"].isin(delays)].copy()
    series = common.add_series(curves, axes=("delay.steps", "epoch"))
    metric = common.Metric(curves)  # test accuracy, or a language model's test loss
    mean = (curves.groupby(["series", "delay.steps", "epoch"])
            .agg(test_acc=(metric.test, "mean"), train_loss=("train_loss", "mean"),
                 seeds=("run_id", "nunique")).reset_index())
    fig, axes = plt.subplots(2, len(delays), figsize=(3.2 * len(delays), 5.6), squeeze=False,
                             sharex=True, sharey="row", constrained_layout=True)
    for j, d in enumerate(delays):
        at_d = mean[mean["delay.steps"] == d]
        for name, style in common.styles(series).items():
            rows = at_d[at_d["series"] == name]
            kw = dict(**style, label=name, lw=1.6)
            axes[0, j].plot(rows["epoch"], rows["test_acc"], **kw)
            axes[1, j].plot(rows["epoch"], rows["train_loss"], **kw)
        axes[0, j].set_title(f"delay D = {d}")
        axes[1, j].set_yscale("log")
        # labelled ticks at 1, 2, 5 x 10^k only: matplotlib's minor labels collided
        axes[1, j].yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
        axes[1, j].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        axes[1, j].yaxis.set_minor_formatter(NullFormatter())
        axes[1, j].set_xlabel("epoch")
        for ax in axes[:, j]:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            ax.grid(alpha=0.3)
    common.accuracy_axis(axes[0, 0], list(mean["test_acc"]), curves)
    level = common.chance(curves)
    for ax in axes[0, 1:] if level is not None else []:
        ax.axhline(level, color="0.5", ls=":", lw=1, zorder=1)
    axes[0, 0].set_ylabel(f"test {metric.name}")
    axes[1, 0].set_ylabel("train loss")
    handles, labels = axes[0, 0].get_legend_handles_labels()  # below the panels, not over them
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncol=2 if len(labels) > 3 else len(labels))
    fig.suptitle("Training curves (mean over seeds; no error bars)", fontsize=11)
    common.save(fig, mean, args.out, "training_curves")


if __name__ == "__main__":
    main()
