"""The quadratic with S pipeline stages: largest stable x = eta * lambda_max against S, per
optimizer, under per-stage delays 2(S-1-s) (solid) and under one constant delay equal to the
first stage's, 2(S-1) (dashed); SGDM's exact pipeline limit as black dots."""

import matplotlib.pyplot as plt

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, table="results/pipeline_stability.csv").parse_args(argv)
    table = common.load(args.table)
    if table.empty:
        common.skip("pipeline_stability", "empty table")
    fig, ax = plt.subplots(figsize=(6, 4))
    for optim in common.ordered(table["optim"]):
        for kind, ls in (("pipeline", "-"), ("constant", "--")):
            rows = table[(table["optim"] == optim) & (table["kind"] == kind)].sort_values("stages")
            label = f"{common.label(optim)}, " + ("per-stage delays" if kind == "pipeline"
                                                   else "constant delay 2(S-1)")
            ax.plot(rows["stages"], rows["x_max"], ls=ls, marker="o", ms=3, color=common.color(optim), label=label)
    exact = table[table["kind"] == "pipeline"].drop_duplicates("stages").sort_values("stages")
    ax.plot(exact["stages"], exact["sgdm_analytic"], "k.", ms=9, zorder=5, label="SGDM per-stage, exact")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(table["stages"].unique()), [str(s) for s in sorted(table["stages"].unique())])
    ax.set_yscale("log")
    ax.set_xlabel("pipeline stages S (first stage's delay 2(S-1))")
    ax.set_ylabel("largest stable x = eta * lambda_max")
    m, rho = table["momentum"].iloc[0], table["rho"].iloc[0]
    ax.set_title(f"Pipeline stages on a quadratic (m = {m}, AB rho = {rho})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, ncol=2)
    common.save(fig, table, args.out, "pipeline_stability")


if __name__ == "__main__":
    main()
