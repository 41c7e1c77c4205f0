"""Real asynchronous training against the delay models that claim to describe it.

For an experiment with ``delay.kind: async`` runs (experiments/digits_async.yaml): final test
accuracy against the worker count N, per optimizer, for the real runs (free, and with a slow
worker), the simulator at a constant delay N - 1, at a geometric delay of mean N - 1, and at the
replay of each real run's own trace.txt (``abexp replay``). Beside it, the real staleness of each
async run (mean, standard deviation, 99th percentile, maximum, from trace.txt), and whether each
replay ended with its async run's weights and test accuracy bitwise (model.pt's parameters
compared tensor by tensor). Series are matched to N as: async ``delay.workers``; constant ``delay.steps + 1``;
geometric ``delay.mean + 1``; a replay takes the N and series of the run whose trace it reads.

Writes async_vs_model.png/.pdf/.csv, async_vs_model_table.md (accuracy, mean ± std over seeds,
n seeds), async_staleness_table.md and async_replay_check.md; and async_equivalence.md/.csv, the
equivalence test of the constant model (``--margin``, default 0.05 = 5 accuracy points): per
optimizer, real series and N, the per-seed paired difference real − constant (a seed fixes the
initial weights and the batches), its mean with the 90% t-interval — two one-sided t-tests at 5%
each, equivalent when it lies inside ±margin — and the 95% interval (different when it excludes
0), and the seeds a margin of that size needs at the observed spread (stats.seeds_for_equivalence).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from abexp.config import read_trace_columns
from abexp.figures import common, stats
from abexp.figures.staleness import in_words

SERIES = {"async": "real async, N workers",
          "async_slow": "real async, {slow}",
          "replay": "simulator replaying the real trace",
          "replay_slow": "simulator replaying the slow-worker trace",
          "constant": "simulator, constant D = N - 1",
          "geometric": "simulator, geometric, mean N - 1"}
STYLE = {"async": dict(ls="-", marker="o"), "async_slow": dict(ls="-", marker="s"),
         "replay": dict(ls="none", marker="x", ms=9), "replay_slow": dict(ls="none", marker="+", ms=11),
         "constant": dict(ls="--", marker="^"), "geometric": dict(ls=":", marker="v")}


def _is_set(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) not in ("", "None", "null")


def staleness(trace: Path) -> dict:
    taus = np.array(read_trace_columns(str(trace))[0], dtype=float)
    return {"tau_mean": taus.mean(), "tau_std": taus.std(), "tau_p99": float(np.percentile(taus, 99)),
            "tau_max": taus.max(), "updates": len(taus)}


def same_weights(a: Path, b: Path) -> bool:
    """Every parameter tensor of two model.pt files bitwise equal. BN running statistics are
    left out: the server runs no forward pass and keeps none (docs/async.md, BN statistics)."""
    import torch
    if not (a.exists() and b.exists()):
        return False
    wa, wb = (({k: v for k, v in torch.load(f, weights_only=True).items()
                if "running_" not in k and "num_batches_tracked" not in k}) for f in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def rows(table: pd.DataFrame, runs: Path) -> pd.DataFrame:
    """One row per run: its series, N, seed, optimizer, accuracy (and staleness / replay check)."""
    by_id = table.set_index("run_id")
    out = []
    for _, run in table.iterrows():
        kind = run.get("delay.kind")
        row = {"run_id": run["run_id"], "optim": run["optim.name"], "seed": int(run["seed"]),
               "test_acc": float(run["test_acc"])}
        if kind == "async":
            row["series"] = "async_slow" if in_words(run.get("delay.slowdown")) else "async"
            row["slow"] = in_words(run.get("delay.slowdown"))
            row["N"] = int(run["delay.workers"])
            trace = runs / run["run_id"] / "trace.txt"
            if trace.exists():
                row.update(staleness(trace))
        elif kind == "constant":
            row["series"], row["N"] = "constant", int(run["delay.steps"]) + 1
        elif kind == "geometric" and _is_set(run.get("delay.mean")):
            row["series"], row["N"] = "geometric", int(round(float(run["delay.mean"]))) + 1
        elif kind == "trace" and _is_set(run.get("delay.trace")):
            source = Path(str(run["delay.trace"])).parent.name
            if source not in by_id.index or by_id.loc[source].get("delay.kind") != "async":
                continue
            src = by_id.loc[source]
            row["series"] = "replay_slow" if in_words(src.get("delay.slowdown")) else "replay"
            row["N"] = int(src["delay.workers"])
            row["replays"] = source
            row["same_test_acc"] = float(src["test_acc"]) == row["test_acc"]
            row["same_weights"] = same_weights(runs / source / "model.pt", runs / run["run_id"] / "model.pt")
        else:
            continue
        out.append(row)
    return pd.DataFrame(out)


def names(data: pd.DataFrame) -> dict[str, str]:
    """Each series in words; the slow-worker one says which slowdown ("one worker 3x slower")."""
    slow = sorted({w for w in data.get("slow", pd.Series(dtype=object)).dropna() if w})
    return {k: v.format(slow="; ".join(slow) or "slow workers") for k, v in SERIES.items()}


def cell(values: pd.Series) -> str:
    if len(values) == 1:
        return f"{values.iloc[0]:.3f} (1 seed)"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def tables(data: pd.DataFrame, out: Path) -> None:
    label = names(data)
    counts = sorted(data["N"].unique())
    seeds = sorted(data["seed"].unique())
    lines = [f"Final test accuracy, mean ± std over seeds {', '.join(map(str, seeds))} (N workers; the "
             "simulated series at delay N − 1)", "",
             "| optimizer | series | " + " | ".join(f"N={n}" for n in counts) + " |",
             "|---|---|" + "---|" * len(counts)]
    for optim in common.ordered(data["optim"].unique()):
        for series in SERIES:
            part = data[(data["optim"] == optim) & (data["series"] == series)]
            if part.empty:
                continue
            cells = [cell(part[part["N"] == n]["test_acc"]) if (part["N"] == n).any() else "" for n in counts]
            lines.append(f"| {common.label(optim)} | {label[series]} | " + " | ".join(cells) + " |")
    (out / "async_vs_model_table.md").write_text("\n".join(lines) + "\n")
    real = data[data["series"].isin(["async", "async_slow"])]
    if "tau_mean" in real:
        lines = ["Real staleness of the async runs (from trace.txt; per run, then mean over its "
                 "optimizers and seeds)", "",
                 "| series | N | runs | mean τ | std τ | p99 τ | max τ |", "|---|---|---|---|---|---|---|"]
        for (series, n), g in real.groupby(["series", "N"]):
            lines.append(f"| {label[series]} | {n} | {len(g)} | {g['tau_mean'].mean():.2f} | "
                         f"{g['tau_std'].mean():.2f} | {g['tau_p99'].mean():.1f} | {int(g['tau_max'].max())} |")
        (out / "async_staleness_table.md").write_text("\n".join(lines) + "\n")
    replays = data[data["series"].isin(["replay", "replay_slow"])]
    if not replays.empty:
        both = replays["same_weights"] & replays["same_test_acc"]
        lines = [f"{int(both.sum())} of {len(replays)} replays ended with their async run's weights "
                 "(every parameter tensor of model.pt) and test accuracy bitwise."]
        for _, r in replays[~both].iterrows():
            lines.append(f"- differs: replay {r['run_id']} of {r['replays']} (weights equal: "
                         f"{bool(r['same_weights'])}, test accuracy equal: {bool(r['same_test_acc'])})")
        (out / "async_replay_check.md").write_text("\n".join(lines) + "\n")


def verdict(low90: float, high90: float, low95: float, high95: float, margin: float) -> str:
    """The claim the intervals allow: equivalent (the 90% interval inside ±margin, TOST),
    different (the 95% interval excludes 0), both, or not resolved."""
    inside = -margin < low90 and high90 < margin
    apart = low95 > 0 or high95 < 0
    if inside:
        return f"equivalent within ±{margin:g}" + (" (and different from 0)" if apart else "")
    return "different" if apart else "not resolved"


def equivalence(data: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Per optimizer, real series and N: the paired per-seed test of real − constant D = N − 1."""
    out = []
    constant = data[data["series"] == "constant"]
    for (optim, series, n), real in data[data["series"].isin(["async", "async_slow"])].groupby(["optim", "series", "N"]):
        model = constant[(constant["optim"] == optim) & (constant["N"] == n)].set_index("seed")["test_acc"]
        real = real.set_index("seed")["test_acc"]
        seeds = sorted(set(real.index) & set(model.index))
        if len(seeds) < 2:
            continue
        diffs = [float(real[s] - model[s]) for s in seeds]
        mean, sd, low90, high90 = stats.t_interval(diffs, 0.90)
        _, _, low95, high95 = stats.t_interval(diffs, 0.95)
        out.append({"optim": optim, "series": series, "N": int(n), "seeds": len(seeds),
                    "real": float(real[seeds].mean()), "constant": float(model[seeds].mean()),
                    "mean_diff": mean, "sd_diff": sd, "low90": low90, "high90": high90, "low95": low95,
                    "high95": high95, "margin": margin, "verdict": verdict(low90, high90, low95, high95, margin),
                    "seeds_needed": stats.seeds_for_equivalence(margin, sd)})
    return pd.DataFrame(out)


def equivalence_table(table: pd.DataFrame, labels: dict[str, str], out: Path) -> None:
    margin = float(table["margin"].iloc[0])
    lines = [f"Is the constant delay D = N − 1 equivalent to real asynchronous training within ±{margin:g} "
             "test accuracy? Per seed: real − constant at the same seed; mean, 90% t-interval (two one-sided "
             "t-tests at 5%: equivalent when inside the margin) and 95% t-interval (different when it "
             "excludes 0); the last column: paired seeds for 80% power to show equivalence at this "
             "spread if the true difference is 0.", "",
             "| optimizer | real series | N | seeds | real | constant | real − constant | 90% interval | "
             "95% interval | verdict | seeds needed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        need = "" if r["seeds_needed"] is None or r["seeds_needed"] != r["seeds_needed"] else int(r["seeds_needed"])
        lines.append(f"| {common.label(r['optim'])} | {labels[r['series']]} | {r['N']} | {r['seeds']} | "
                     f"{r['real']:.3f} | {r['constant']:.3f} | {r['mean_diff']:+.3f} | "
                     f"[{r['low90']:+.3f}, {r['high90']:+.3f}] | [{r['low95']:+.3f}, {r['high95']:+.3f}] | "
                     f"{r['verdict']} | {need} |")
    (out / "async_equivalence.md").write_text("\n".join(lines) + "\n")
    table.to_csv(out / "async_equivalence.csv", index=False)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--margin", type=float, default=0.05,
                   help="equivalence margin in test accuracy (default 0.05: 5 points)")
    args = p.parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if table.empty or "delay.kind" not in table or not (table["delay.kind"] == "async").any():
        common.skip("async_vs_model", "no finished async runs")
    data = rows(table, Path(args.table).resolve().parent / "runs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables(data, out)
    tested = equivalence(data, args.margin)
    if not tested.empty:
        equivalence_table(tested, names(data), out)
    optims = common.ordered(data["optim"].unique())
    fig, axes = plt.subplots(1, len(optims), figsize=(5.2 * len(optims), 3.8), squeeze=False, sharey=True)
    for ax, optim in zip(axes[0], optims):
        for series, name in names(data).items():
            part = data[(data["optim"] == optim) & (data["series"] == series)]
            if part.empty:
                continue
            g = part.groupby("N")["test_acc"]
            mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
            ax.errorbar(mean.index, mean.values, yerr=std.values, label=name, capsize=2, lw=1.2,
                        **STYLE[series])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(data["N"].unique()), [str(n) for n in sorted(data["N"].unique())])
        ax.set_xlabel("workers N (simulated delay: N − 1)")
        ax.set_title(common.label(optim))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final test accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"Real asynchronous training vs the delay models (mean over seeds; {common.ERRORBARS})", fontsize=10)
    common.save(fig, data, args.out, "async_vs_model")


if __name__ == "__main__":
    main()
