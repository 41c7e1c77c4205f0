"""Shared plumbing of the figure scripts: the table, one colour per optimizer, saving.

Every script reads only the tables ``abexp collect`` writes (runs, and per-epoch curves) or
``abexp stability --out``, and writes PNG + PDF + the CSV of exactly the numbers it shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from abexp.config import NON_IDENTITY_KEYS  # noqa: E402

# one colour per optimizer, the same in every figure
COLORS = {"sgdm": "#1f77b4", "ab": "#d62728", "sc": "#2ca02c", "lwp": "#9467bd",
          "dcasgd": "#8c564b", "salr": "#e377c2", "ab_lwp": "#ff7f0e", "sc_lwp": "#17becf",
          "adam": "#7f7f7f", "adamw": "#bcbd22", "ab_adam": "#e7298a", "ab_adamw": "#66a61e"}
LABELS = {"sgdm": "SGDM", "ab": "AB", "sc": "SC", "lwp": "LWP", "dcasgd": "DC-ASGD",
          "salr": "staleness-aware lr", "ab_lwp": "AB + LWP", "sc_lwp": "SC + LWP",
          "adam": "Adam", "adamw": "AdamW", "ab_adam": "AB-Adam", "ab_adamw": "AB-AdamW"}

LINESTYLES = ["-", "--", ":", "-."]  # several series of one optimizer: one colour, these styles


def ordered(optims) -> list[str]:
    """Optimizers in one fixed order (SGDM first), whatever order the table has them in."""
    known = list(COLORS)
    return sorted(set(optims), key=lambda o: (known.index(o) if o in known else len(known), o))


def add_series(table: pd.DataFrame, axes: tuple[str, ...] = ("delay.steps",)) -> dict[str, str]:
    """Give every run a ``series`` label; return {series: optimizer} in plotting order.

    A series is an optimizer plus every other config key that varies among that optimizer's
    runs and is not one of the figure's own axes: figures average over seeds only, never over
    a key the spec varied (fp32 and bf16 runs, two learning rates, two experiments stay apart).
    """
    skip = {"optim.name", "seed", *axes}
    config = [c for c in table.columns if "." in c and c not in skip
              and not any(c == k or c.startswith(k + ".") for k in NON_IDENTITY_KEYS)]
    table["series"] = ""
    for optim, runs in table.groupby("optim.name"):
        keys = [c for c in config if runs[c].astype(str).nunique() > 1]
        table.loc[runs.index, "series"] = [label(optim) + "".join(f", {k}={row[k]}" for k in keys)
                                           for _, row in runs.iterrows()]
    optim_of = dict(zip(table["series"], table["optim.name"]))
    rank = {o: i for i, o in enumerate(ordered(optim_of.values()))}
    return {s: optim_of[s] for s in sorted(optim_of, key=lambda s: (rank[optim_of[s]], s))}


def styles(series: dict[str, str]) -> dict[str, dict]:
    """Line style per series: its optimizer's colour; a second series of it dashed, and so on."""
    out, seen = {}, {}
    for name, optim in series.items():
        out[name] = {"color": color(optim), "ls": LINESTYLES[seen.get(optim, 0) % len(LINESTYLES)]}
        seen[optim] = seen.get(optim, 0) + 1
    return out


def parser(description: str, table: str = "results/runs.csv") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--table", default=table, help="table from abexp collect")
    p.add_argument("--out", default="results/figures", help="folder for PNG, PDF and CSV")
    p.add_argument("--experiment", help="only rows of this experiment (spec name)")
    return p


def load(path: str, experiment: str | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        sys.exit(f"{path}: no such table (run `abexp collect -o {path}` first)")
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if experiment is not None and "experiment" in table.columns:
        table = table[table["experiment"] == experiment]
    return table


def finished(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["status"].isin(["completed", "diverged"])].copy()


def color(optim: str) -> str:
    return COLORS.get(optim, "#7f7f7f")


def label(optim: str) -> str:
    return LABELS.get(optim, optim)


def bn_note(table: pd.DataFrame) -> str:
    modes = sorted(set(table.get("eval_bn", pd.Series(dtype=str)).dropna()))
    names = {"running": "BN running stats", "recalibrate": "BN recalibrated at current weights"}
    return "; ".join(names.get(m, m) for m in modes)


def save(fig, data: pd.DataFrame, out: str, name: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{name}.png", dpi=150, bbox_inches="tight")
    fig.savefig(folder / f"{name}.pdf", bbox_inches="tight")
    data.to_csv(folder / f"{name}.csv", index=False)
    plt.close(fig)
    print(f"wrote {folder / name}.png/.pdf/.csv")


def skip(name: str, why: str) -> None:
    print(f"skipped {name}: {why}")
    sys.exit(0)


def log2_delay_axis(ax, delays) -> None:
    """Delay on a log2 axis that still shows 0 (symlog, linear below 1)."""
    ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)
    ticks = sorted(set(int(d) for d in delays))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("gradient delay D (steps)")
