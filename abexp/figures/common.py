"""Shared plumbing of the figure scripts: the table, one colour per optimizer, series named
in words, an accuracy axis fitted to the data with the chance level marked, saving.

Every script reads only the tables ``abexp collect`` writes (runs, and per-epoch curves) or
``abexp stability --out``, and writes PNG + PDF + the CSV of exactly the numbers it shows.
A script with nothing to draw (a sweep, a single seed, no pipeline runs) says so in one line
and exits 0 (``Skipped``), so the scripts after it still run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from abexp.config import NON_IDENTITY_KEYS  # noqa: E402

LINESTYLES = ["-", "--", ":", "-."]  # several series of one optimizer: one colour, these styles

# what every error bar in abexp's figures is, said on the figure itself (title or legend):
# a spread of the seeds, not a confidence interval (abexp/figures/paired.py gives those)
ERRORBARS = "error bars: ±1 sd over seeds (sample sd, n − 1; none for one seed), not a CI"


def ordered(optims) -> list[str]:
    """Optimizers in one fixed order (SGDM first), whatever order the table has them in."""
    from abexp.registry import RULES
    known = RULES.names()
    return sorted(set(optims), key=lambda o: (known.index(o) if o in known else len(known), o))


def add_series(table: pd.DataFrame, axes: tuple[str, ...] = ("delay.steps",)) -> dict[str, str]:
    """Give every run a ``series`` label; return {series: optimizer} in plotting order.

    A series is an optimizer plus every other config key that varies among that optimizer's
    runs and is not one of the figure's own axes: figures average over seeds only, never over
    a key the spec varied (fp32 and bf16 runs, two learning rates, two experiments stay apart).
    Labels are words: "AB + Nesterov", "SGDM, bf16", "AB, lr 0.05" (``describe``).
    """
    skip = {"optim.name", "seed", *axes}
    config = [c for c in table.columns if "." in c and c not in skip
              and not any(c == k or c.startswith(k + ".") for k in NON_IDENTITY_KEYS)]
    table["series"] = ""
    for optim, runs in table.groupby("optim.name"):
        keys = [c for c in config if runs[c].astype(str).nunique() > 1]
        if "experiment" in runs and runs["experiment"].astype(str).nunique() > 1 and "experiment" not in axes:
            keys.append("experiment")
        table.loc[runs.index, "series"] = [label(optim) + "".join(describe(k, row[k]) for k in keys)
                                           for _, row in runs.iterrows()]
    optim_of = dict(zip(table["series"], table["optim.name"]))
    rank = {o: i for i, o in enumerate(ordered(optim_of.values()))}
    return {s: optim_of[s] for s in sorted(optim_of, key=lambda s: (rank[optim_of[s]], s))}


# config keys in words, for series labels; any other key is shown as "name value"
WORDS = {"optim.lr": "lr", "optim.momentum": "momentum", "optim.rho": "ρ", "optim.weight_decay": "wd",
         "train.epochs": "epochs", "train.batch_size": "batch", "delay.kind": "delay",
         "optim.dc_lambda": "λ", "optim.lwp_horizon": "horizon", "schedule.epoch_factors": "lr × epoch factors"}


def describe(key: str, value) -> str:
    """One varying key of a series in words: ``+ Nesterov`` (or nothing when off), ``, bf16``,
    ``, lr 0.05`` (numbers to 3 significant digits: no 16-digit learning rates in a legend)."""
    if key == "optim.nesterov":
        return " + Nesterov" if str(value) == "True" else ""
    if key == "delay.stage_profile":
        return ", per-stage delays 2(S-1-s)" if value == "pipeline" else ", flat delay 2(S-1)"
    if key == "delay.stashing":
        return ", stashed" if str(value) == "True" else ", unstashed"
    if key in ("train.precision", "experiment"):
        return f", {value}"
    if isinstance(value, bool) or str(value) in ("True", "False"):
        name = key.split(".")[-1].replace("_", " ")
        return f", {name}" if str(value) == "True" else f", no {name}"
    if isinstance(value, float):
        value = f"{value:.3g}"
    return f", {WORDS.get(key, key.split('.')[-1].replace('_', ' '))} {value}"


def chance(table: pd.DataFrame) -> float | None:
    """The chance level an accuracy axis marks: 1/classes of the table's datasets (their
    records in abexp.registry.DATASETS); None when one is not a classification task or its
    record is not loaded (a plugin's dataset without its plugin): no chance line then."""
    from abexp.registry import DATASETS

    names = set(table.get("data.name", pd.Series(dtype=str)).dropna())
    levels = [r.chance if r is not None else None for r in (DATASETS.find(n) for n in names)]
    if any(level is None for level in levels):
        return None
    return min(levels, default=0.1)


class Metric:
    """What a table's runs are judged by: test accuracy (higher is better; a diverged run counts
    as 0) or, for a language model's dataset (abexp.registry.DATASETS task language_model), test
    loss in nats per character (lower is better; a diverged run counts as infinite loss)."""

    def __init__(self, table: pd.DataFrame):
        from abexp.registry import DATASETS

        names = set(table.get("data.name", pd.Series(dtype=str)).dropna())
        records = [DATASETS.find(n) for n in names]
        self.lower = bool(records) and all(r is not None and r.lower_is_better for r in records)
        self.test, self.val = ("test_loss", "val_loss") if self.lower else ("test_acc", "val_acc")
        self.name = "loss (nats/char)" if self.lower else "accuracy"
        self.diverged = float("inf") if self.lower else 0.0

    def better(self, values: pd.Series):
        """The index of the best value (ties: the first)."""
        return values.idxmin() if self.lower else values.idxmax()

    def scores(self, table: pd.DataFrame, column: str | None = None) -> pd.Series:
        """Each run's value of ``column`` (default: the test metric), a diverged or unfinished
        run counted as the worst (accuracy 0, loss infinite), so it ranks last, never absent."""
        return table[column or self.test].where(table["status"] == "completed", self.diverged)

    @property
    def harm(self) -> float:
        """The sign that makes ``harm * (at D = 0 - at D_max)`` positive when the delay hurt."""
        return -1.0 if self.lower else 1.0

    @property
    def axis_label(self) -> str:
        return ("final test loss, nats/char (diverged = inf)" if self.lower
                else "final test accuracy (diverged = 0)")


@dataclass(frozen=True)
class DelayAxis:
    """What the per-delay tables (tuned_lr, paired) put a study's runs side by side on: one
    delay D for the whole network (delay.steps), or a pipeline's stage count S (delay.stages,
    each stage delayed 2(S−1−s); S = 1 is undelayed). ``suffix`` names the second kind's files."""

    letter: str
    word: str
    undelayed: int
    suffix: str


CONSTANT_AXIS = DelayAxis("D", "delay", 0, "")
STAGES_AXIS = DelayAxis("S", "stage count", 1, "_stages")


def per_view(name: str, table: pd.DataFrame, report) -> None:
    """``report(view, axis)`` for each of ``delay_views(table)``; a view with nothing to show
    skips alone (its line printed), the script ``name`` only when every view skipped."""
    views = delay_views(table)
    if not views:
        skip(name, "no finished runs")
    written = 0
    for axis, view in views:
        try:
            report(view, axis)
            written += 1
        except Skipped:
            continue
    if not written:
        raise Skipped(0)


def undelayed_from_pipeline(pipeline: pd.DataFrame, whole: pd.DataFrame) -> pd.DataFrame:
    """A study that runs its undelayed reference once, as the pipeline's S = 1 (bitwise the
    constant D = 0 run: tests/test_lm_run.py), lends those runs to its constant delays as D = 0:
    each S = 1 run with its delay keys set to those of the same optimizer's constant runs (one
    run per config and seed, should several pipeline profiles have run S = 1)."""
    one = pipeline[pipeline["delay.stages"].astype(int) == 1].copy()
    delay_keys = [c for c in whole.columns if c.startswith("delay.") and c in one.columns]
    rows = []
    for optim, runs in one.groupby("optim.name"):
        like = whole[whole["optim.name"] == optim]
        if like.empty:
            continue
        runs = runs.copy()
        for key in delay_keys:
            runs[key] = like[key].iloc[0]
        runs["delay.steps"] = 0
        rows.append(runs)
    if not rows:
        return one.iloc[0:0]
    lent = pd.concat(rows, ignore_index=True)
    return lent.drop_duplicates(subset=[c for c in lent.columns if "." in c or c in ("seed", "epoch")])  # a per-epoch table keeps its epochs


def delay_views(table: pd.DataFrame) -> list[tuple[DelayAxis, pd.DataFrame]]:
    """The table split by how its runs are delayed: runs with one delay for the whole network on
    D; pipeline runs on S, their stage count copied into ``delay.steps`` (and ``delay.stages``
    dropped, so it is the axis, not a series key) so per-delay code reads one column. Async and
    replayed runs are in neither (async_vs_model reads them). Where the constant delays have no
    D = 0, the pipeline's S = 1 runs stand in for it (``undelayed_from_pipeline``)."""
    if "delay.kind" not in table:
        return [(CONSTANT_AXIS, table)] if not table.empty else []
    views = []
    whole = table[~table["delay.kind"].isin(["pipeline", "async", "trace"])].copy()
    pipeline = table[table["delay.kind"] == "pipeline"].copy()
    if not whole.empty and "delay.stages" in pipeline and not (whole["delay.steps"] == 0).any():
        whole = pd.concat([whole, undelayed_from_pipeline(pipeline, whole)], ignore_index=True)
    if not whole.empty:
        views.append((CONSTANT_AXIS, whole))
    if not pipeline.empty and "delay.stages" in pipeline:
        pipeline["delay.steps"] = pipeline["delay.stages"].astype(int)
        views.append((STAGES_AXIS, pipeline.drop(columns=["delay.stages"])))
    return views


def accuracy_axis(ax, values, table: pd.DataFrame) -> tuple[float, float]:
    """Fit the y-range to the accuracies shown (and the chance level, marked as a dotted line,
    where the dataset has one); returns (bottom, top). Diverged runs are drawn at the bottom."""
    level = chance(table)
    shown = [float(v) for v in values if v == v and v != float("inf")] + ([level] if level is not None else [])
    low, high = min(shown), max(shown)
    pad = max(0.02, 0.08 * (high - low))
    if Metric(table).lower:  # a loss: the axis inverted, so better is up and diverged at the bottom
        bottom, top = high + pad, max(0.0, low - pad)
        ax.set_ylim(bottom, top)
        return bottom, top
    bottom, top = max(-0.02, low - pad), min(1.0, high + pad)
    ax.set_ylim(bottom, top)
    if level is None:
        return bottom, top
    ax.axhline(level, color="0.5", ls=":", lw=1, zorder=1)
    ax.annotate("chance", (0.0, level), xycoords=("axes fraction", "data"), xytext=(3, 2),
                textcoords="offset points", ha="left", va="bottom", fontsize=7, color="0.4")
    return bottom, top


def undelayed_references(ax, table: pd.DataFrame, series: dict[str, str], x: str = "delay.steps") -> None:
    """The undelayed SGDM accuracy as a horizontal line: one per SGDM series, so the reference
    stays when SGDM splits into several series (black dashed when there is one)."""
    sgdm = [name for name, optim in series.items() if optim == "sgdm"]
    styled = styles(series)
    for name in sgdm:
        base = table[(table["series"] == name) & (table[x] == 0)]["acc"].dropna()
        if not len(base):
            continue
        color = "k" if len(sgdm) == 1 else styled[name]["color"]
        ls = "--" if len(sgdm) == 1 else styled[name]["ls"]
        ax.axhline(base.mean(), color=color, ls=ls, lw=0.9, alpha=0.8,
                   label=f"{name}, no delay ({base.mean():.3f})")


def legend(ax, fontsize: float = 8) -> None:
    """A legend inside the axes when it is short, beside them when it is long (a long legend
    inside hides the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) > 5:
        ax.legend(handles, labels, fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0)
    elif labels:
        ax.legend(handles, labels, fontsize=fontsize, loc="best")


def is_sweep(table: pd.DataFrame) -> bool:
    """Runs of an Optuna sweep (variant ``trial``): each is one point of a search, not a grid
    cell, so the delay figures do not apply (abexp.figures.sweep draws them)."""
    return "variant" in table and len(table) > 0 and (table["variant"] == "trial").all()


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
    """The optimizer's colour in every figure: its rule's record (grey when not registered)."""
    from abexp.registry import RULES
    record = RULES.find(optim)
    return record.color if record is not None else "#7f7f7f"


def label(optim: str) -> str:
    from abexp.registry import RULES
    record = RULES.find(optim)
    return record.label or optim if record is not None else optim


def has_bn(table: pd.DataFrame) -> bool:
    """Whether any run of the table has BN layers (its model's record; a model whose record is
    not loaded counts as having them)."""
    from abexp.registry import MODELS

    names = set(table.get("model.name", pd.Series(dtype=str)).dropna())
    records = [MODELS.find(n) for n in names]
    return not names or any(r is None or r.batch_norm for r in records)


def bn_note(table: pd.DataFrame) -> str:
    """How BN statistics were evaluated; nothing for runs of models without BN, where the
    phrase would describe nothing."""
    if not has_bn(table):
        return ""
    modes = sorted(set(table.get("eval_bn", pd.Series(dtype=str)).dropna()))
    names = {"running": "BN running stats", "recalibrate": "BN recalibrated at current weights"}
    return "; ".join(names.get(m, m) for m in modes)


def bn_prefix(table: pd.DataFrame) -> str:
    """``bn_note; `` for a title's parenthesis, or nothing."""
    note = bn_note(table)
    return f"{note}; " if note else ""


def save(fig, data: pd.DataFrame, out: str, name: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{name}.png", dpi=150, bbox_inches="tight")
    fig.savefig(folder / f"{name}.pdf", bbox_inches="tight")
    data.to_csv(folder / f"{name}.csv", index=False)
    plt.close(fig)
    print(f"wrote {folder / name}.png/.pdf/.csv")


class Skipped(SystemExit):
    """Nothing to draw: a clean exit 0 for a script run alone, one line for the driver."""


def skip(name: str, why: str) -> None:
    print(f"skipped {name}: {why}")
    raise Skipped(0)


def skip_sweeps(name: str, table: pd.DataFrame) -> None:
    if is_sweep(table):
        skip(name, "a sweep's trials (see sweep_objective.png and sweep_history.png)")


def log2_delay_axis(ax, delays) -> None:
    """Delay on a log2 axis that still shows 0 (symlog, linear below 1)."""
    ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)
    ticks = sorted(set(int(d) for d in delays))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("gradient delay D (steps)")
