"""Markdown and LaTeX tables of final test accuracy (a language model: test loss in nats per
character, lower is better) vs delay per optimizer (mean ± std, n)."""

from pathlib import Path

from abexp.figures import common


def cell(mean, std, n, diverged) -> str:
    if n == 0:
        return "diverged" if diverged else "–"
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if n > 1 else "")
    return text + (f" ({diverged} div.)" if diverged else "")


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if "delay.kind" in table:  # no delay of their own: async runs and replays are async_vs_model's
        table = table[~table["delay.kind"].isin(["async", "trace"])]
    if table.empty:
        common.skip("tables", "no finished runs")
    common.skip_sweeps("tables", table)
    metric = common.Metric(table)
    table["acc"] = table[metric.test].where(table["status"] == "completed")
    table["div"] = table["status"] == "diverged"
    series = common.add_series(table)
    summary = (table.groupby(["series", "delay.steps"])
               .agg(mean=("acc", "mean"), std=("acc", "std"), n=("acc", "count"), diverged=("div", "sum"))
               .reset_index())
    delays = sorted(summary["delay.steps"].unique())
    cells = {(r["series"], r["delay.steps"]): cell(r["mean"], r["std"], r["n"], int(r["diverged"]))
             for r in summary.to_dict("records")}
    md = ["| optimizer | " + " | ".join(f"D={d}" for d in delays) + " |",
          "|---|" + "---|" * len(delays)]
    for name in series:
        md.append(f"| {name} | " + " | ".join(cells.get((name, d), "–") for d in delays) + " |")
    tex = ["\\begin{tabular}{l" + "c" * len(delays) + "}", "\\toprule",
           "Optimizer & " + " & ".join(f"$D={d}$" for d in delays) + " \\\\", "\\midrule"]
    for name in series:
        row = [cells.get((name, d), "--").replace("±", "$\\pm$") for d in delays]
        tex.append(name.replace("_", r"\_") + " & " + " & ".join(row) + " \\\\")
    tex += ["\\bottomrule", "\\end{tabular}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bn = f" ({common.bn_note(table)})" if common.bn_note(table) else ""
    note = f"Final test {metric.name}{bn}; mean ± std over seeds.\n\n"
    (out / "accuracy_table.md").write_text(note + "\n".join(md) + "\n")
    (out / "accuracy_table.tex").write_text("\n".join(tex) + "\n")
    summary.to_csv(out / "accuracy_table.csv", index=False)
    print(f"wrote {out / 'accuracy_table'}.md/.tex/.csv")


if __name__ == "__main__":
    main()
