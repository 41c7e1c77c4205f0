"""Issue 39's comparisons that pair the rows of two machines: the same run on two CPU kinds, and
the brake control's arms against stage 2's SGDM.

The brake control (experiments/fashion_mnist_evidence_brake_schedule.yaml) re-ran AB's runs of
the evidence study — the same configs, so the same run ids — on another machine; its rows file
and the evidence study's rows hold the same run twice, once per CPU kind. Joined by run id, the
difference is what the CPU kind alone does to a run (the training code of the two commits is the
same). The control, its AB arm and DC-ASGD's two forms (experiments/fashion_mnist_evidence_dcasgd.yaml,
each at its own selected lr) are also paired by seed with stage 2's SGDM and AB, each at its own
validation-selected lr: pairings across the two machines. Test-accuracy points, mean and 95%
t-interval (abexp.figures.stats), from the committed rows alone:

    python analysis/evidence_across.py -o results/fashion_mnist_evidence_across.md   # make study-tables
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tables import ROOT, STUDIES, spec_rows  # noqa: E402

from abexp import io  # noqa: E402
from abexp.figures.stats import paired_t_p, t_interval  # noqa: E402


def accuracy(rows: pd.DataFrame, suffix: str = "") -> pd.Series:
    """Final test accuracy in points, 0 for a diverged run (as the paired tables count it)."""
    return rows["test_acc" + suffix].where(rows["status" + suffix] != "diverged", 0.0) * 100


def line(label: str, diffs: list[float]) -> str:
    mean, sd, low, high = t_interval(diffs)
    p = paired_t_p(mean, sd, len(diffs))
    per_seed = " ".join(f"{d:+.2f}" for d in diffs)
    return (f"| {label} | {per_seed} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {len(diffs)} | "
            f"{'–' if p != p else '<0.0001' if p < 1e-4 else f'{p:.4f}'} |")


def by_seed(a: pd.DataFrame, b: pd.DataFrame) -> list[float]:
    """a − b, paired by seed (each frame one cell: one run per seed)."""
    joined = a.assign(acc=accuracy(a)).merge(b.assign(acc=accuracy(b)), on="seed", suffixes=("_a", "_b"))
    return list((joined["acc_a"] - joined["acc_b"]).values)


def selected(rows: pd.DataFrame, delay: int, **keys) -> pd.DataFrame:
    """One arm's runs at its selected lr: the lr of its cell with the most seeds (a study's second
    stage runs only the selected one)."""
    cell = rows[rows["delay.steps"] == delay]
    for key, value in keys.items():
        cell = cell[cell[key] == value]
    lr = cell.groupby("optim.lr")["seed"].nunique().idxmax()
    return cell[cell["optim.lr"] == lr].sort_values("seed")


def table() -> list[str]:
    evidence = spec_rows(STUDIES["fashion_mnist_evidence"])
    control = spec_rows(STUDIES["fashion_mnist_evidence_brake_schedule"])
    same = control.merge(evidence, on="run_id", suffixes=("", "_evidence"))
    lines = ["Rows of two machines, test-accuracy points: per-seed differences, their mean, 95% Student-t "
             "interval, pairs, paired t-test p (unadjusted). Drawn by analysis/evidence_across.py from "
             f"{STUDIES['fashion_mnist_evidence'].rows} and {STUDIES['fashion_mnist_evidence_brake_schedule'].rows}.",
             "", "| comparison | per-seed differences | mean | 95% t-interval | pairs | p |", "|---|---|---|---|---|---|"]
    for delay, cell in same.groupby("delay.steps"):
        cell = cell.sort_values("seed")
        kinds = f"{cell['cpu'].iloc[0]} − {cell['cpu_evidence'].iloc[0]}"
        diffs = list((accuracy(cell) - accuracy(cell, "_evidence")).values)
        lines.append(line(f"D = {delay}: the same {cell['optim.name'].iloc[0]} runs (run ids), {kinds}", diffs))
    # later specs' arms, each at its own lr, against stage 2's SGDM and AB at theirs
    arms = [(delay, "SGDM × AB's mean brake" if name == "sgdm" else "AB (the control's arm)", arm.sort_values("seed"))
            for (delay, name), arm in control.groupby(["delay.steps", "optim.name"], sort=False)]
    dcasgd = spec_rows(STUDIES["fashion_mnist_evidence_dcasgd"])
    for adaptive, label in ((False, "DC-ASGD, λ 0.04"), (True, "DC-ASGD-a, λ₀ 2")):
        for delay in sorted(set(dcasgd["delay.steps"])):
            arms.append((delay, label, selected(dcasgd, delay, **{"optim.dc_adaptive": adaptive})))
    for delay, label, arm in arms:
        for baseline in ("sgdm", "ab") if "control" not in label else ("sgdm",):  # its AB pairs: the rows above
            base = selected(evidence, delay, **{"optim.name": baseline})
            lines.append(line(f"D = {delay}: {label} (lr {arm['optim.lr'].iloc[0]:g}) − stage 2's "
                              f"{baseline.upper()} (lr {base['optim.lr'].iloc[0]:g})", by_seed(arm, base)))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", help="write the table here (atomically) instead of printing it")
    args = parser.parse_args(argv)
    if not (ROOT / STUDIES["fashion_mnist_evidence_brake_schedule"].rows).exists():
        print("skipped: no brake-control rows yet", file=sys.stderr)
        return 0
    text = "\n".join(table()) + "\n"
    if args.output:
        io.write_text(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
