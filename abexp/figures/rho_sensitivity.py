"""AB's braking strength: the final test metric vs rho, one line per delay (rho = 0 is the rule
without its brake). Every rule that reads optim.rho (abexp.registry.RULES: ab, ab_lwp, ab_adamw,
ab_muon, ...); a language model's test loss where the dataset's task says so (common.Metric)."""

import matplotlib.pyplot as plt

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if not table.empty:
        from abexp.registry import RULES
        braked = [n for n in table["optim.name"].unique() if (r := RULES.find(n)) is not None and "rho" in r.keys]
        table = table[table["optim.name"].isin(braked)]
    if table.empty or table["optim.rho"].nunique() < 2:
        common.skip("rho_sensitivity", "needs AB runs at 2 or more values of optim.rho")
    common.skip_sweeps("rho_sensitivity", table)
    metric = common.Metric(table)
    table["acc"] = metric.scores(table)
    series = common.add_series(table, axes=("delay.steps", "optim.rho"))
    summary = (table.groupby(["series", "delay.steps", "optim.rho"])["acc"]
               .agg(["mean", "std", "count"]).reset_index())
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    delays = sorted(summary["delay.steps"].unique())
    for n, name in enumerate(series):
        for i, d in enumerate(delays):
            rows = summary[(summary["series"] == name) & (summary["delay.steps"] == d)].sort_values("optim.rho")
            ax.errorbar(rows["optim.rho"], rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3,
                        ls=common.LINESTYLES[n % len(common.LINESTYLES)], color=cmap(i / max(1, len(delays) - 1)),
                        label=f"D = {d}" if len(series) == 1 else f"{name}, D = {d}")
    ax.set_xlabel("AB braking strength rho")
    ax.set_ylabel(metric.axis_label)
    common.accuracy_axis(ax, list(summary["mean"] + summary["std"].fillna(0)) + list(summary["mean"]), table)
    ax.set_title(f"Adaptive Braking: sensitivity to rho\n({common.bn_prefix(table)}mean;\n{common.ERRORBARS})", fontsize=10)
    ax.grid(alpha=0.3)
    common.legend(ax)
    common.save(fig, summary, args.out, "rho_sensitivity")


if __name__ == "__main__":
    main()
