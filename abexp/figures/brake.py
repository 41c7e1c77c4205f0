"""The braking Adaptive Braking actually applied, per epoch: does AB do more than shrink the lr?

Every AB rule logs, per epoch, the mean and the spread (population sd) of its factor 1 − ρ·cos(g, v)
over every (step, parameter tensor) pair (metrics.jsonl's ``brake_mean``/``brake_sd``;
abexp/sim/brake.py). A factor that stayed at one value would make AB SGDM at a smaller lr; how far
the mean moves over training, and how wide the spread is within an epoch, is what AB does beyond
that. Reads the per-epoch table (``abexp collect``'s epochs.csv) and writes, per delay axis
(D, or the pipeline's S):

- ``brake.md`` (and ``brake_table.csv``): per optimizer, delay and lr, the factor's mean in the first epoch, the
  last, and over all epochs (each the mean over seeds of the runs' logged values), with the
  within-epoch spread beside it (the mean over seeds of ``brake_sd``) and the seeds;
- ``brake.png`` (its data: ``brake.csv``, per epoch): the mean factor per epoch, one panel per optimizer and delay, one line per lr,
  the band ± the within-epoch spread (not a confidence interval: the spread of the factor itself).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import pandas as pd

from abexp.figures import common


# the band is the factor's own spread within an epoch, not seeds' sd (common.ERRORBARS) nor an interval
BAND = "band: ± its spread within the epoch, not an interval"


def summary(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per (series, delay, lr, epoch): the mean over seeds of brake_mean and brake_sd."""
    return (curves.groupby(["series", "delay.steps", "optim.lr", "epoch"])
            .agg(brake_mean=("brake_mean", "mean"), brake_sd=("brake_sd", "mean"), seeds=("run_id", "nunique"))
            .reset_index())


def table_rows(per_epoch: pd.DataFrame) -> pd.DataFrame:
    """Per (series, delay, lr): first, last and all-epoch means of the factor and its spread."""
    rows = []
    for (name, delay, lr), epochs in per_epoch.groupby(["series", "delay.steps", "optim.lr"], sort=False):
        epochs = epochs.sort_values("epoch")
        first, last = epochs.iloc[0], epochs.iloc[-1]
        rows.append({"series": name, "delay": int(delay), "lr": float(lr), "seeds": int(epochs["seeds"].max()),
                     "epochs": len(epochs),
                     "first_mean": first["brake_mean"], "first_sd": first["brake_sd"],
                     "last_mean": last["brake_mean"], "last_sd": last["brake_sd"],
                     "all_mean": epochs["brake_mean"].mean(), "all_sd": epochs["brake_sd"].mean()})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, table="results/epochs.csv").parse_args(argv)
    curves = common.load(args.table, args.experiment)
    if curves.empty or "brake_mean" not in curves or curves["brake_mean"].isna().all():
        common.skip("brake", "no run logged a brake (no AB rule, or runs from before it was logged)")
    common.skip_sweeps("brake", curves)
    if "status" in curves:  # finished runs only, as every other table (a running run's epochs would move)
        curves = common.finished(curves)
    curves = curves[curves["brake_mean"].notna()].copy()
    common.per_view("brake", curves, lambda view, axis: report(view, axis, args.out))


def report(curves: pd.DataFrame, axis: common.DelayAxis, out: str) -> None:
    """brake{suffix}.md/.csv/.png of one delay axis."""
    stem, D = f"brake{axis.suffix}", axis.letter
    series = common.add_series(curves, axes=("delay.steps", "optim.lr", "epoch"))
    per_epoch = summary(curves)
    rank = {name: i for i, name in enumerate(series)}
    per_epoch = per_epoch.sort_values(["series", "delay.steps", "optim.lr", "epoch"],
                                      key=lambda c: c.map(rank) if c.name == "series" else c, ignore_index=True)
    rows = table_rows(per_epoch)
    lines = [f"The factor 1 − ρ·cos(g, v) each AB rule applied, per {axis.word} and lr: its mean over every "
             "(step, parameter tensor) pair of an epoch, with the spread (population sd) of the factor within "
             "the epoch in brackets — a spread, not an interval; each the mean over the seeds. A factor "
             "that never moved would be SGDM at a smaller lr.", "",
             f"| optimizer | {D} | lr | seeds | first epoch | last epoch | all epochs |", "|---|---|---|---|---|---|---|"]
    for r in rows.to_dict("records"):
        lines.append(f"| {r['series']} | {r['delay']} | {r['lr']:g} | {r['seeds']} | "
                     f"{r['first_mean']:.3f} ({r['first_sd']:.3f}) | {r['last_mean']:.3f} ({r['last_sd']:.3f}) | "
                     f"{r['all_mean']:.3f} ({r['all_sd']:.3f}) |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    draw(per_epoch, series, axis, out, stem)  # brake.png/.pdf and brake.csv (per epoch)
    Path(out, f"{stem}.md").write_text(text)
    rows.to_csv(Path(out, f"{stem}_table.csv"), index=False)


def draw(per_epoch: pd.DataFrame, series: dict[str, str], axis: common.DelayAxis, out: str, stem: str) -> None:
    panels = [(name, d) for name in series for d in sorted(per_epoch["delay.steps"].unique())
              if ((per_epoch["series"] == name) & (per_epoch["delay.steps"] == d)).any()]
    names = [n for n in series if any(p[0] == n for p in panels)]
    delays = sorted({d for _, d in panels})
    fig, axes = plt.subplots(len(names), len(delays), figsize=(3.0 * len(delays), 2.6 * len(names)),
                             squeeze=False, sharex=True, sharey=True, constrained_layout=True)
    lrs = sorted(per_epoch["optim.lr"].unique())
    cmap = plt.get_cmap("viridis")
    colour = {lr: cmap(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    for i, name in enumerate(names):
        for j, d in enumerate(delays):
            ax = axes[i, j]
            cell = per_epoch[(per_epoch["series"] == name) & (per_epoch["delay.steps"] == d)]
            if cell.empty:  # e.g. AB + LWP without delay: not run (it is AB there)
                ax.set_axis_off()
                continue
            for lr, line in cell.groupby("optim.lr"):
                ax.plot(line["epoch"], line["brake_mean"], color=colour[lr], lw=1.4, label=f"lr {lr:g}")
                ax.fill_between(line["epoch"], line["brake_mean"] - line["brake_sd"],
                                line["brake_mean"] + line["brake_sd"], color=colour[lr], alpha=0.08)
            ax.axhline(1.0, color="0.5", ls=":", lw=1)
            ax.set_title(f"{name}, {axis.letter} = {d}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.tick_params(labelbottom=True, labelleft=True)  # a panel left empty must not take the labels
            ax.set_xlabel("epoch")
            ax.set_ylabel("1 − ρ cos(g, v)")
    handles = {}
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    ordered = sorted(handles, key=lambda l: float(l.split()[1]))
    fig.legend([handles[l] for l in ordered], ordered, fontsize=8, loc="outside lower center", ncol=min(6, len(ordered)))
    fig.suptitle(f"AB's brake factor per epoch (mean over seeds; {BAND})", fontsize=10)
    common.save(fig, per_epoch, out, stem)


if __name__ == "__main__":
    main()
