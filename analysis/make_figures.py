"""Regenerate every figure from results/ alone (no training): ``make figures``.

Collects results/runs into results/runs.csv and results/epochs.csv, computes the quadratic
stability tables once (results/stability.csv, and results/pipeline_stability.csv for pipeline
stages; analyses, not training), then runs each figure
script per experiment into results/figures/<experiment>/.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
RUN_SCRIPTS = ["accuracy_vs_delay", "accuracy_vs_stages", "delay_drop", "heatmaps", "rho_sensitivity", "tables"]


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default="results")
    p.add_argument("--experiment", action="append", help="only these experiments (default: all)")
    p.add_argument("--stability-delays", default="0 1 2 4 8 16 32")
    p.add_argument("--stability-optims", default="sgdm ab sc lwp")
    p.add_argument("--stability-stages", default="1 2 4 8 16",
                   help="pipeline stages for results/pipeline_stability.csv ('' to skip)")
    args = p.parse_args()
    res = Path(args.results)
    runs, epochs, stab = res / "runs.csv", res / "epochs.csv", res / "stability.csv"
    py = sys.executable
    # a damaged run folder is skipped with a warning; the figures are still drawn, and the
    # command exits non-zero at the end so the damage is not missed
    print("+ abexp collect", flush=True)
    collect_rc = subprocess.run([py, "-m", "abexp.cli", "collect", "--results", str(res), "-o", str(runs),
                                 "--curves", str(epochs)]).returncode
    if not stab.exists():
        sh(py, "-m", "abexp.cli", "stability", "--optim", *args.stability_optims.split(),
           "--delays", *args.stability_delays.split(), "--out", str(stab))
    sh(py, str(HERE / "stability.py"), "--table", str(stab), "--out", str(res / "figures"))
    pipe = res / "pipeline_stability.csv"
    if args.stability_stages and not pipe.exists():
        sh(py, "-m", "abexp.cli", "stability", "--optim", *args.stability_optims.split(),
           "--stages", *args.stability_stages.split(), "--out", str(pipe))
    if pipe.exists():
        sh(py, str(HERE / "pipeline_stability.py"), "--table", str(pipe), "--out", str(res / "figures"))
    table = pd.read_csv(runs)
    experiments = args.experiment or sorted(set(table.get("experiment", pd.Series(dtype=str)).dropna()))
    for exp in experiments:
        out = str(res / "figures" / (exp or "unnamed"))
        for script in RUN_SCRIPTS:
            sh(py, str(HERE / f"{script}.py"), "--table", str(runs), "--experiment", exp, "--out", out)
        sh(py, str(HERE / "training_curves.py"), "--table", str(epochs), "--experiment", exp, "--out", out)
    if collect_rc:
        sys.exit(f"make_figures: collect skipped damaged run folders (exit {collect_rc}); figures omit them")


if __name__ == "__main__":
    main()
