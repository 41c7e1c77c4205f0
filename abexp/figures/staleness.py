"""Staleness histograms of real asynchronous runs (delay.kind async): how often each delay
occurred, read from each run folder's trace.txt, one panel per worker count, one line per
series (optimizer, slowdown), the constant delay N - 1 that fifo order would give marked.
The trace's first N - 1 updates (the fill, staleness 0..N-2) are included as they happened."""

import json
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from abexp.config import read_trace_columns
from abexp.figures import common


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    args = p.parse_args(argv)
    table = common.finished(common.load(args.table, args.experiment))
    if "delay.kind" in table:
        table = table[table["delay.kind"] == "async"]
    if table.empty or "delay.workers" not in table:
        common.skip("staleness", "no finished async runs")
    runs = Path(args.table).resolve().parent / "runs"
    rows = []
    for _, run in table.iterrows():
        trace = runs / run["run_id"] / "trace.txt"
        if not trace.exists():
            continue
        for tau, n in Counter(read_trace_columns(str(trace))[0]).items():
            rows.append({"workers": int(run["delay.workers"]), "order": run.get("delay.order", "arrival"),
                         "slowdown": in_words(run.get("delay.slowdown")), "optim": run["optim.name"],
                         "seed": run["seed"], "staleness": tau, "updates": n})
    if not rows:
        common.skip("staleness", f"no trace.txt under {runs}")
    data = pd.DataFrame(rows)
    counts = sorted(data["workers"].unique())
    cols = min(3, len(counts))
    rows_ = -(-len(counts) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols, 2.7 * rows_), squeeze=False,
                             constrained_layout=True)
    names = sorted({(o, sd) for o, sd in zip(data["order"], data["slowdown"])}, key=lambda k: (k[1] != "", k))
    colour = {k: f"C{i}" for i, k in enumerate(names)}  # one colour per series in every panel
    for ax, n in zip(axes.flat, counts):
        part = data[data["workers"] == n]
        for (order, slowdown), g in part.groupby(["order", "slowdown"]):
            share = g.groupby("staleness")["updates"].sum()
            share = share / share.sum()
            name = order if not slowdown else f"{order}, {slowdown}"
            ax.plot(share.index, share.values, marker="o", ms=3, label=name, color=colour[(order, slowdown)])
        ax.axvline(n - 1, color="k", lw=0.8, ls="--")
        ax.set_title(f"N = {n} workers")
        ax.set_xlabel("staleness (updates)")
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat[len(counts):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("share of updates")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Real staleness of asynchronous runs (dashed: N − 1, fifo's constant delay)", fontsize=9)
    common.save(fig, data, args.out, "staleness")


def in_words(slowdown) -> str:
    """``[1, 1, 1, 3]`` -> "one worker 3x slower" (the same words at every N, so one colour);
    no slowdown (or all 1) -> ""."""
    if isinstance(slowdown, str):
        try:
            slowdown = json.loads(slowdown)
        except ValueError:
            return ""
    if not isinstance(slowdown, list) or all(f == 1 for f in slowdown):
        return ""
    slow = sorted({f for f in slowdown if f != 1})
    count = sum(f != 1 for f in slowdown)
    who = "one worker" if count == 1 else f"{count} workers"
    return f"{who} {'/'.join(f'{f:g}' for f in slow)}x slower"


if __name__ == "__main__":
    main()
