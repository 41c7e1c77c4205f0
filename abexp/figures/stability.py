"""The quadratic: largest stable x = eta * lambda_max vs delay per optimizer, with analytic SGDM."""

import matplotlib.pyplot as plt

from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, table="results/stability.csv").parse_args(argv)
    table = common.load(args.table)
    if table.empty:
        common.skip("stability", "empty stability table")
    fig, ax = plt.subplots(figsize=(6, 4))
    analytic = table.drop_duplicates("delay").sort_values("delay")
    ax.plot(analytic["delay"], analytic["sgdm_analytic"], "k--", lw=1.2, zorder=5,
            label="SGDM, analytic (roots of the characteristic polynomial)")
    for optim in common.ordered(table["optim"]):
        rows = table[table["optim"] == optim].sort_values("delay")
        ax.plot(rows["delay"], rows["x_max"], marker="o", color=common.color(optim),
                label=f"{common.label(optim)}, simulated")
    common.log2_delay_axis(ax, table["delay"])
    ax.set_yscale("log")
    ax.set_ylabel("largest stable x = eta * lambda_max")
    m, rho = table["momentum"].iloc[0], table["rho"].iloc[0]
    ax.set_title(f"Stability on a quadratic (m = {m}, AB rho = {rho})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    common.save(fig, table, args.out, "stability")


if __name__ == "__main__":
    main()
