"""The committed tables of the long studies, redrawn from their committed rows alone.

A long study's results folder is not committed; its rows are (analysis/study_rows.py: one row per
finished run, with the status and dataset the tables need). README and docs/studies.md quote
tables drawn from those rows by the same figure modules `abexp figures` runs, so a clean clone
redraws them digit for digit:

    make study-tables        # = python analysis/study_tables.py

Each study's tables land in results/ as <study>_<table>.md (and the tuned-lr figure as .png):
issue 40's shakespeare_gpt and issue 39's fashion_mnist_evidence (and its 34-epoch runs) and per-stage
digits_pipeline_seeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from abexp import io
from abexp.figures import accuracy_vs_stages, brake, common, paired, tuned_lr
from abexp.lab.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Study:
    rows: str  # the committed rows, relative to the repository root
    baseline: str | tuple[str, ...]  # the optimizer paired.md compares every other with; several: each its own
    also_paired_with: tuple[str, ...] = ()  # more baselines: <table>_vs_<name>.md each
    copied: tuple[str, ...] = ("tuned_lr.md", "tuned_lr_stages.md", "tuned_lr_stages.png",
                               "paired.md", "paired_stages.md", "paired_cost.md", "paired_cost_stages.md")
    per_stage_means: bool = False  # also accuracy_vs_stages' means, as <study>_accuracy.csv
    specs: tuple[str, ...] = ()  # only the rows of these specs' runs (by run id), when rows hold several studies
    epochs: str | None = None  # per-epoch brake rows (study_rows --epochs): <study>_brake.md, when the file exists


STUDIES = {
    # weight prediction (lwp_muon) is read against the rule it predicts for, Muon, and against AB-Muon
    "shakespeare_gpt": Study("results/shakespeare_gpt_runs.csv", baseline="adamw", also_paired_with=("muon", "ab_muon")),
    # issue 39's lr selection on validation (stage 1, 2 seeds) and, once stage 2 has run, 8 paired seeds
    # (and every rule against AB: is any mitigation ahead of AB, or behind it?)
    "fashion_mnist_evidence": Study("results/fashion_mnist_evidence_runs.csv", baseline="sgdm", also_paired_with=("ab",),
                                    specs=("experiments/fashion_mnist_evidence.yaml",
                                           "experiments/fashion_mnist_evidence_confirm.yaml"),  # stage 2, once written
                                    epochs="results/fashion_mnist_evidence_epochs.csv"),
    # its ablations share the rows (and the unablated arms' runs); each rule paired with its unablated arm
    "fashion_mnist_evidence_ablations": Study("results/fashion_mnist_evidence_runs.csv",
                                              baseline=("AB, ρ 1, ab cosine tensor", "LWP, lwp lookahead linear",
                                                        "AB + LWP, lwp lookahead linear"),
                                              specs=("experiments/fashion_mnist_evidence_ablations.yaml",)),
    # DC-ASGD's adaptive lambda against the constant one, each arm's lr selected on validation (two stages)
    "fashion_mnist_evidence_dcasgd": Study("results/fashion_mnist_evidence_runs.csv",
                                           baseline="DC-ASGD, λ 0.04, no dc adaptive",
                                           specs=("experiments/fashion_mnist_evidence_dcasgd.yaml",
                                                  "experiments/fashion_mnist_evidence_dcasgd_confirm.yaml")),
    # SGDM at AB's lr with AB's mean brake per epoch as its lr schedule, against AB (own folder and rows)
    "fashion_mnist_evidence_brake_schedule": Study("results/fashion_mnist_evidence_brake_schedule_runs.csv",
                                                   baseline="ab",
                                                   specs=("experiments/fashion_mnist_evidence_brake_schedule.yaml",)),
    # the paper-length runs at the lrs stage 1 selected: one lr per cell, so paired and paired_cost only
    "fashion_mnist_evidence_34ep": Study("results/fashion_mnist_evidence_34ep_runs.csv", baseline="sgdm",
                                         epochs="results/fashion_mnist_evidence_34ep_epochs.csv"),
    # one lr for every rule (no tuned-lr table): the per-stage pairing with SGDM and the means
    "digits_pipeline_seeds": Study("results/digits_pipeline_seeds_runs.csv", baseline="sgdm", per_stage_means=True),
}


def baselines(study: Study) -> tuple[str, ...]:
    """The study's baselines as a tuple (an ablation study pairs each optimizer with its own)."""
    return (study.baseline,) if isinstance(study.baseline, str) else study.baseline


def spec_rows(study: Study) -> pd.DataFrame:
    """The study's rows whose run ids its specs expand to (run ids ignore the experiment label,
    so a run shared by two specs belongs to both)."""
    # a later stage's spec (abexp confirm) is listed before it is written: absent, it has no runs yet
    specs = [load_spec(ROOT / spec) for spec in study.specs if (ROOT / spec).exists()]
    ids = {run.run_id for spec in specs for run in spec.expand(warn=lambda m: None)}
    rows = pd.read_csv(ROOT / study.rows)
    rows = rows[rows["run_id"].isin(ids)].copy()
    rows["experiment"] = specs[0].name  # one study: a shared run's label must not split it
    return rows


def draw(name: str, study: Study, out: Path) -> list[Path]:
    """The study's tables from its rows, copied to ``out`` as <name>_<table>; returns them."""
    written = []
    if not (ROOT / study.rows).exists():  # a study whose first row is not committed yet
        print(f"skipped {name}: no {study.rows} yet", file=sys.stderr)
        return written
    with tempfile.TemporaryDirectory() as tmp:
        rows = str(ROOT / study.rows)
        if study.specs:  # this study's runs only
            rows = str(Path(tmp) / "rows.csv")
            io.write_text(rows, spec_rows(study).to_csv(index=False))
        table = ["--table", rows, "--out", tmp]
        if study.epochs and (ROOT / study.epochs).exists():  # the brake each AB run applied, per epoch
            per_epoch = pd.read_csv(rows).merge(pd.read_csv(ROOT / study.epochs), on="run_id")
            io.write_text(Path(tmp) / "epochs.csv", per_epoch.to_csv(index=False))
            try:
                brake.main(["--table", str(Path(tmp) / "epochs.csv"), "--out", tmp])
            except common.Skipped:
                pass
        for figure, extra in ((tuned_lr, []), (paired, paired.baseline_argv(baselines(study)))):
            try:
                figure.main(table + extra)
            except common.Skipped:  # e.g. one seed: nothing to pair yet
                pass
        copies = {file: f"{name}_{file}" for file in study.copied + ("brake.md", "brake_stages.md")}
        if study.per_stage_means:
            accuracy_vs_stages.main(table)
            copies["accuracy_vs_stages.csv"] = f"{name}_accuracy.csv"
        for other in study.also_paired_with:
            folder = Path(tmp) / f"vs_{other}"
            try:
                paired.main(["--table", rows, "--out", str(folder), "--baseline", other])
            except common.Skipped:
                pass
            for stem in ("paired", "paired_stages", "paired_cost", "paired_cost_stages"):
                copies[f"vs_{other}/{stem}.md"] = f"{name}_{stem}_vs_{other}.md"
        for file, copy in copies.items():
            made = Path(tmp) / file
            if made.exists():
                target = out / copy
                io.write_bytes(target, made.read_bytes())
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="append", choices=sorted(STUDIES), help="only this study (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "results"), help="where the tables go (default results/)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.study or sorted(STUDIES):
        written = draw(name, STUDIES[name], out)
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
        for path in stale(name, written, out):
            print(f"stale: {path} was not drawn from the rows this time (delete it if the study no longer has it)",
                  file=sys.stderr)
    return 0


def stale(name: str, written: list[Path], out: Path) -> list[Path]:
    """The study's tables in ``out`` that this drawing did not write (another study's whose name
    extends this one's, fashion_mnist_evidence_34ep for fashion_mnist_evidence, are not its)."""
    if not (ROOT / STUDIES[name].rows).exists():
        return []
    longer = [other for other in STUDIES if other != name and other.startswith(name + "_")]
    mine = [p for p in sorted(out.glob(f"{name}_*")) if p.suffix in (".md", ".png")
            and not any(p.name.startswith(other + "_") for other in longer)]
    return [p for p in mine if p not in written]


if __name__ == "__main__":
    sys.exit(main())
