"""The accuracy lost to a delay against training length: for each optimizer and each run
length (train.epochs), the paired per-seed drop acc(D = 0) − acc(D = D_max), every seed as a
dot and the mean as a line, against optimizer steps (log axis). Issue 23's question: does the
drop vanish at the paper's step count? A diverged run counts as accuracy 0. A language model
(common.Metric) is judged by test loss: its drop is the loss the delay added, loss(D_max) −
loss(D = 0) (a diverged run: infinite).
"""

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from abexp.figures import common


def drops(table: pd.DataFrame, d_max: int, harm: float = 1.0) -> pd.DataFrame:
    """One row per (series, epochs, seed) with both ends present: the paired drop, signed by
    ``harm`` (common.Metric.harm) so that a positive drop is always the delay's harm."""
    rows = []
    for (name, epochs), runs in table.groupby(["series", "train.epochs"]):
        at = {d: runs[runs["delay.steps"] == d].set_index("seed") for d in (0, d_max)}
        for seed in sorted(set(at[0].index) & set(at[d_max].index)):
            rows.append({"series": name, "epochs": int(epochs), "steps": int(at[0].loc[seed, "steps"]),
                         "seed": int(seed), "acc_D0": at[0].loc[seed, "acc"], "acc_Dmax": at[d_max].loc[seed, "acc"],
                         "drop": harm * (at[0].loc[seed, "acc"] - at[d_max].loc[seed, "acc"])})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if "delay.kind" in table:
        table = table[~table["delay.kind"].isin(["pipeline", "async", "trace"])]  # one delay for the whole network only
    if table.empty or "train.epochs" not in table or table["train.epochs"].nunique() < 2:
        common.skip("drop_vs_length", "needs runs at 2 or more training lengths (train.epochs)")
    common.skip_sweeps("drop_vs_length", table)
    d_max = int(table["delay.steps"].max())
    metric = common.Metric(table)
    table["acc"] = metric.scores(table)
    series = common.add_series(table, axes=("delay.steps", "train.epochs"))
    per_seed = drops(table, d_max, metric.harm)
    if per_seed.empty:
        common.skip("drop_vs_length", f"no run length has the same seed at D = 0 and D = {d_max}")
    rank = {name: i for i, name in enumerate(series)}
    per_seed = per_seed.sort_values(["epochs", "seed"]).sort_values("series", key=lambda s: s.map(rank), kind="stable")
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    styles = common.styles(series)
    for name in series:
        rows = per_seed[per_seed["series"] == name]
        if rows.empty:
            continue
        mean = rows.groupby("steps")["drop"].mean()
        ax.plot(mean.index, mean.values, marker="o", lw=1.8, label=name, **styles[name])
        ax.scatter(rows["steps"], rows["drop"], color=styles[name]["color"], s=14, alpha=0.5, zorder=3)
    ax.axhline(0, color="0.5", ls=":", lw=1)
    ax.set_xscale("log")
    ticks = sorted(per_seed["steps"].unique())
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("optimizer steps of the run")
    what, word = ("test loss added", "loss") if metric.lower else ("accuracy drop", "acc")
    ax.set_ylabel(f"{what}, D = 0 → {d_max}")
    ax.set_title(f"{'Loss added by' if metric.lower else 'Accuracy lost to'} a delay of {d_max} steps vs training length\n"
                 f"({common.bn_prefix(table)}paired per seed, line = mean,\ndots = seeds, no error bars)", fontsize=10)
    ax.grid(alpha=0.3)
    common.legend(ax)
    common.save(fig, per_seed, args.out, "drop_vs_length")
    lines = [f"| optimizer | epochs | steps | D = {d_max} as share | per seed: {word} D = 0 → D = {d_max} "
             f"({'rise' if metric.lower else 'drop'}) | {'rise' if metric.lower else 'drop'} mean ± sd |",
             "|---|---|---|---|---|---|"]
    for (name, epochs), rows in per_seed.groupby(["series", "epochs"], sort=False):
        steps = int(rows["steps"].iloc[0])
        each = ", ".join(f"s{r['seed']}: {r['acc_D0']:.4f} → {r['acc_Dmax']:.4f} ({r['drop']:.4f})"
                         for r in rows.to_dict("records"))
        spread = f" ± {rows['drop'].std(ddof=1):.4f}" if len(rows) > 1 else " (one seed)"
        lines.append(f"| {name} | {epochs} | {steps:,} | {d_max / steps:.2%} | {each} | {rows['drop'].mean():.4f}{spread} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "drop_vs_length.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
