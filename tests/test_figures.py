"""Every figure script on a results table made by real tiny runs; the table numbers are right."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from abexp.lab.collect import collect, collect_epochs, write_table
from abexp.lab.spec import load_spec
from abexp.train.start import train_run

ROOT = Path(__file__).resolve().parent.parent
BASE = """
base:
  model: {name: resnet8}
  data: {name: digits, subset: 64, test_subset: 48}
  train: {epochs: 2, batch_size: 32}
  schedule: {name: constant}
"""
SPECS = {
    "delay": "name: fig\n" + BASE + """
variants: {sgdm: {optim.name: sgdm}, ab: {optim.name: ab}}
grid: {delay.steps: [0, 2], seed: [0, 1]}
""",
    "heat": "name: fig\n" + BASE + """
grid: {delay.steps: [0, 2], optim.lr: [0.05, 0.1], optim.momentum: [0.5, 0.9]}
""",
    "rho": "name: fig\n" + BASE + """
variants: {ab: {optim.name: ab}}
grid: {delay.steps: [0, 2], optim.rho: [0.5, 2.0]}
""",
    "pipe": "name: pipe\n" + BASE + """
variants: {per_stage: {delay.stage_profile: pipeline}, flat: {delay.stage_profile: flat}}
grid: {delay.kind: [pipeline], delay.stages: [1, 2], optim.name: [sgdm, ab]}
""",
    "length": "name: length\n" + BASE + """
grid: {train.epochs: [1, 2], seed: [0, 1], delay.steps: [0, 2]}
""",
    "diverge": "name: fig\n" + BASE + """
variants: {sgdm: {optim.name: sgdm, optim.lr: 1.0e+30, train.divergence_check_every: 1}}
grid: {delay.steps: [2]}
""",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    for name, text in SPECS.items():
        spec = root / f"{name}.yaml"
        spec.write_text(text)
        for run in load_spec(spec).expand(warn=lambda m: None):
            train_run(run.config, root / "runs" / run.run_id, device="cpu", log=lambda s: None)
    write_table(collect(root), root / "runs.csv")
    write_table(collect_epochs(root), root / "epochs.csv")
    subprocess.run([sys.executable, "-m", "abexp.cli", "stability", "--optim", "sgdm", "ab",
                    "--delays", "0", "2", "--steps", "600", "--out", str(root / "stability.csv")],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "abexp.cli", "stability", "--optim", "sgdm", "ab",
                    "--stages", "1", "2", "--steps", "600", "--out", str(root / "pipeline_stability.csv")],
                   check=True, capture_output=True)
    return root


def run_script(name, *args):
    proc = subprocess.run([sys.executable, "-m", f"abexp.figures.{name}", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("script,table,outputs", [
    ("accuracy_vs_delay", "runs.csv", ["accuracy_vs_delay"]),
    ("heatmaps", "runs.csv", ["heatmap_sgdm"]),
    ("rho_sensitivity", "runs.csv", ["rho_sensitivity"]),
    ("training_curves", "epochs.csv", ["training_curves"]),
    ("brake", "epochs.csv", ["brake"]),
    ("stability", "stability.csv", ["stability"]),
    ("accuracy_vs_stages", "runs.csv", ["accuracy_vs_stages"]),
    ("pipeline_stability", "pipeline_stability.csv", ["pipeline_stability"]),
])
def test_each_figure_script_writes_png_pdf_csv(results, tmp_path, script, table, outputs):
    run_script(script, "--table", str(results / table), "--out", str(tmp_path))
    for name in outputs:
        for ext in ("png", "pdf", "csv"):
            path = tmp_path / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 0, path
    assert len(pd.read_csv(tmp_path / f"{outputs[0]}.csv")) > 0


def test_table_numbers_match_the_collected_results(results, tmp_path):
    run_script("tables", "--table", str(results / "runs.csv"), "--experiment", "fig", "--out", str(tmp_path))
    shown = pd.read_csv(tmp_path / "accuracy_table.csv")
    # naive recomputation straight from result.json files: runs that differ only in seed are
    # averaged, nothing else (the table holds several lrs, momenta and rhos per optimizer)
    accs = {}
    for f in (results / "runs").glob("*/result.json"):
        r = json.loads(f.read_text())
        if r["status"] == "completed" and r["experiment"] == "fig":
            config = {k: v for k, v in r["config"].items() if k != "seed"}
            accs.setdefault(json.dumps(config, sort_keys=True), []).append(r["test_acc"])
    expected = sorted((len(v), round(sum(v) / len(v), 12)) for v in accs.values())
    got = sorted((int(r["n"]), round(r["mean"], 12)) for r in shown.to_dict("records") if r["n"] > 0)
    assert got == expected and max(n for n, _ in got) == 2  # the two-seed spec's groups
    md = (tmp_path / "accuracy_table.md").read_text()
    assert "| AB, ρ 2 |" in md and "| SGDM, lr 0.05, momentum 0.5," in md  # series named in words
    assert "| SGDM, lr 1e+30, " in md and "| diverged |" in md  # the diverged run, in its own row
    assert "\\begin{tabular}" in (tmp_path / "accuracy_table.tex").read_text()


def test_brake_table_is_the_seed_mean_of_what_each_ab_run_logged(results, tmp_path):
    """Recomputed from the runs' own metrics.jsonl: per AB cell, the first/last/all-epoch mean
    of brake_mean and brake_sd over the seeds; SGDM runs (no brake) are not in it."""
    run_script("brake", "--table", str(results / "epochs.csv"), "--experiment", "fig", "--out", str(tmp_path))
    shown = pd.read_csv(tmp_path / "brake_table.csv")
    logged = {}
    for folder in (results / "runs").glob("*"):
        result = json.loads((folder / "result.json").read_text())
        config = result["config"]
        if result["experiment"] != "fig" or config["optim"]["name"] != "ab" or config["optim"].get("rho") != 1.0:
            continue
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        epochs = [line for line in lines if "brake_mean" in line]
        logged.setdefault(config["delay"]["steps"], []).append(epochs)
    assert set(logged) == {0, 2} and all(len(runs) == 2 for runs in logged.values())
    assert set(shown["series"]) == {"AB, ρ 0.5", "AB, ρ 1", "AB, ρ 2"}  # "fig" also varies AB's ρ; no SGDM
    shown = shown[shown["series"] == "AB, ρ 1"]
    assert sorted(shown["delay"]) == [0, 2]
    for delay, runs in logged.items():
        row = shown[shown["delay"] == delay].iloc[0]
        first = sum(r[0]["brake_mean"] for r in runs) / 2
        last_sd = sum(r[-1]["brake_sd"] for r in runs) / 2
        every = sum(sum(e["brake_mean"] for e in r) / len(r) for r in runs) / 2
        assert row["seeds"] == 2 and row["epochs"] == 2
        assert row["first_mean"] == pytest.approx(first) and row["last_sd"] == pytest.approx(last_sd)
        assert row["all_mean"] == pytest.approx(every)
    assert f"| AB, ρ 1 | 2 | {shown['lr'].iloc[0]:g} | 2 | " in (tmp_path / "brake.md").read_text()


def test_accuracy_vs_delay_marks_diverged_runs(results, tmp_path):
    run_script("accuracy_vs_delay", "--table", str(results / "runs.csv"), "--out", str(tmp_path))
    shown = pd.read_csv(tmp_path / "accuracy_vs_delay.csv")
    assert shown["diverged"].sum() >= 1


def test_make_figures_regenerates_everything_from_results_alone(results):
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "figures", "--results",
                           str(results)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    figs = results / "figures" / "fig"
    for name in ("accuracy_vs_delay.png", "heatmap_sgdm.png", "rho_sensitivity.png",
                 "training_curves.png", "accuracy_table.md", "brake.png", "brake.md"):
        assert (figs / name).exists(), name
    assert (results / "figures" / "stability.png").exists()
    assert (results / "figures" / "pipeline_stability.png").exists()
    assert (results / "figures" / "pipe" / "accuracy_vs_stages.png").exists()


def test_accuracy_vs_stages_averages_seeds_per_profile(results, tmp_path):
    run_script("accuracy_vs_stages", "--table", str(results / "runs.csv"), "--experiment", "pipe", "--out", str(tmp_path))
    shown = pd.read_csv(tmp_path / "accuracy_vs_stages.csv")
    # 2 optimizers x 2 profiles, S = 1 and 2; S = 1 is delay 0 in both profiles
    assert len(shown) == 8 and set(shown["stages"]) == {1, 2}
    accs = {}
    for f in (results / "runs").glob("*/result.json"):
        r = json.loads(f.read_text())
        d = r["config"]["delay"]
        if d["kind"] == "pipeline":
            accs[(r["config"]["optim"]["name"], d["stage_profile"], d["stages"])] = r["test_acc"]
    assert sorted(shown["mean"].round(10)) == sorted(round(v, 10) for v in accs.values())
    flat_s1 = accs["sgdm", "flat", 1]
    assert flat_s1 == accs["sgdm", "pipeline", 1]  # one stage: no delay in either profile


def test_delay_drop_is_the_paired_per_seed_difference(results, tmp_path):
    run_script("delay_drop", "--table", str(results / "runs.csv"), "--experiment", "fig", "--out", str(tmp_path))
    shown = pd.read_csv(tmp_path / "delay_drop.csv").set_index("series")
    acc = {}
    for f in (results / "runs").glob("*/result.json"):
        r = json.loads(f.read_text())
        c = r["config"]
        if r["experiment"] == "fig" and c["optim"]["lr"] == 0.1 and c["optim"]["momentum"] == 0.9 \
                and c["optim"]["name"] == "sgdm" and r["status"] == "completed":
            acc[c["seed"], c["delay"]["steps"]] = r["test_acc"]
    drops = [acc[s, 0] - acc[s, 2] for s in (0, 1)]
    [label] = [s for s in shown.index if s.startswith("SGDM, lr 0.1, momentum 0.9")]
    row = shown.loc[label]
    assert row["drop_mean"] == pytest.approx(sum(drops) / 2)
    assert row["drop_sd"] == pytest.approx(abs(drops[0] - drops[1]) / 2 ** 0.5)


def test_series_are_named_in_words():
    from abexp.figures.common import describe, label

    assert label("ab") + describe("optim.nesterov", True) == "AB + Nesterov"
    assert label("ab") + describe("optim.nesterov", False) == "AB"
    assert label("sgdm") + describe("train.precision", "bf16") == "SGDM, bf16"
    assert describe("optim.lr", 0.012345678901234567) == ", lr 0.0123"  # no 16-digit lrs


def test_the_accuracy_axis_fits_the_data_and_marks_chance():
    import matplotlib.pyplot as plt

    from abexp.figures.common import accuracy_axis

    fig, ax = plt.subplots()
    bottom, top = accuracy_axis(ax, [0.31, 0.45, float("nan")], pd.DataFrame({"data.name": ["digits"]}))
    assert 0.0 < bottom < 0.1 < 0.45 < top < 0.6  # 10 classes: chance 0.1 is in view, 0-1 is not
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [0.1]
    plt.close(fig)


def test_one_experiment_takes_no_stability_bisections(results, tmp_path):
    import shutil

    copy = tmp_path / "r"
    shutil.copytree(results / "runs", copy / "runs")
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "figures", "--results", str(copy),
                           "--experiment", "pipe"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "figures" / "pipe" / "accuracy_vs_stages.png").exists()
    assert not (copy / "stability.csv").exists() and not (copy / "figures" / "stability.png").exists()
    # a script with nothing to draw is one line and the rest still run
    assert "skipped heatmaps: needs runs over at least 2 learning rates" in proc.stdout


def test_every_experiment_draws_kept_stability_tables_and_computes_none(results, tmp_path):
    """The stability bisections do not depend on the runs: a run over every experiment draws the
    kept tables, skips a missing one in a line, and computes none (seconds, not minutes)."""
    copy = tmp_path / "r"
    shutil.copytree(results / "runs", copy / "runs")
    shutil.copy(results / "stability.csv", copy / "stability.csv")
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "figures", "--results", str(copy)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "figures" / "stability.png").exists()
    assert (copy / "stability.csv").read_bytes() == (results / "stability.csv").read_bytes()  # drawn, not recomputed
    assert not (copy / "pipeline_stability.csv").exists()
    assert not (copy / "figures" / "pipeline_stability.png").exists()
    assert "skipped pipeline_stability: no " in proc.stdout and "--stability" in proc.stdout
    assert "computing" not in proc.stdout
    assert (copy / "figures" / "pipe" / "accuracy_vs_stages.png").exists()


@pytest.mark.parametrize("present, flag", [((), True), (("stability.csv",), True),
                                           (("stability.csv", "pipeline_stability.csv"), False)])
def test_make_figures_computes_the_stability_tables_when_one_is_missing(tmp_path, present, flag):
    if shutil.which("make") is None:
        pytest.skip("no make")
    for name in present:
        (tmp_path / name).write_text("x\n")
    proc = subprocess.run(["make", "-n", "-s", "figures", f"RESULTS={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True)
    [line] = [ln for ln in proc.stdout.splitlines() if " figures --results " in ln]
    assert line.split()[-1] == "--stability" if flag else line.split()[-1] == str(tmp_path)


def test_a_sweep_gets_its_own_figures_and_a_trials_table(tmp_path, capsys):
    from abexp.cli import main
    from abexp.lab.sweep import load_sweep, open_study, storage_url

    sweep = tmp_path / "sw.yaml"
    sweep.write_text("name: sw\nbase:\n  model: {name: resnet8}\n  data: {name: digits, subset: 64, test_subset: 48}\n"
                     "  train: {epochs: 1, batch_size: 32}\n  schedule: {name: constant}\n"
                     "fixed: {optim.name: ab, delay.steps: 2}\nsampler: {name: random, seed: 0}\nn_trials: 3\n"
                     "space:\n  optim.lr: {type: float, low: 0.01, high: 0.2, log: true}\n"
                     "  optim.rho: {type: float, low: 0.0, high: 2.0}\n")
    res = tmp_path / "r"
    env = dict(__import__("os").environ, WANDB_MODE="disabled")
    assert subprocess.run([sys.executable, "-m", "abexp.cli", "sweep", str(sweep), "--results", str(res),
                           "--no-progress"], env=env, capture_output=True).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "figures", "--results", str(res),
                           "--experiment", "sw"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("sweep_objective", "sweep_history"):
        assert (res / "figures" / "sw" / f"{name}.png").stat().st_size > 0
    assert "skipped the delay figures of sw: a sweep's trials" in proc.stdout
    # the delay scripts on a sweep's rows: one line, exit 0 (delay_drop used to raise KeyError)
    write_table(collect(res), res / "runs.csv")
    for script in ("accuracy_vs_delay", "delay_drop", "tables"):
        out = run_script(script, "--table", str(res / "runs.csv"), "--experiment", "sw", "--out", str(tmp_path / "f"))
        assert out.strip() == f"skipped {script}: a sweep's trials (see sweep_objective.png and sweep_history.png)"
    # --trials: one row per trial, the objective equal to the study's own values
    capsys.readouterr()
    assert main(["sweep", str(sweep), "--results", str(res), "--trials"]) == 0
    out = capsys.readouterr().out.splitlines()
    study = open_study(load_sweep(sweep), storage_url(load_sweep(sweep), res))
    for t in study.get_trials():
        [row] = [line for line in out if line.split()[:2] == [str(t.number), t.state.name]]
        assert f"{t.value:.4f}" in row and t.user_attrs["run_id"] in row
    assert out[-1].startswith("sw: 3 trials (3 COMPLETE)")


def test_drop_vs_length_of_a_spec_is_the_paired_drop_per_run_length(results, tmp_path):
    """The "length" spec shares its 2-epoch runs with the "fig" spec (same configs, same run
    ids; trained once, labelled fig): its figures select its runs by id, not by label."""
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "figures", "--results", str(results),
                           "--spec", str(results / "length.yaml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "length: 8 of its 8 runs found" in proc.stdout
    folder = results / "figures" / "length"
    table = pd.read_csv(folder / "runs.csv")
    assert set(table["experiment"]) == {"length"} and len(table) == 8
    shown = pd.read_csv(folder / "drop_vs_length.csv")
    ids = {r.run_id for r in load_spec(results / "length.yaml").expand(warn=lambda m: None)}
    acc = {}
    for rid in ids:  # naive recomputation from the result files
        r = json.loads((results / "runs" / rid / "result.json").read_text())
        c = r["config"]
        acc[c["train"]["epochs"], c["seed"], c["delay"]["steps"]] = (r["test_acc"], r["steps"])
    assert len(shown) == 4  # 2 lengths x 2 seeds
    for row in shown.to_dict("records"):
        (a0, steps), (a2, _) = acc[row["epochs"], row["seed"], 0], acc[row["epochs"], row["seed"], 2]
        assert row["drop"] == pytest.approx(a0 - a2) and row["steps"] == steps
    assert sorted(set(shown["steps"])) == [2, 4]  # 64 examples / 32 = 2 steps per epoch
    text = (folder / "drop_vs_length.md").read_text()
    assert "| SGDM | 1 | 2 | 100.00% |" in text
    (a0, _), (a2, _) = acc[1, 0, 0], acc[1, 0, 2]
    assert f"s0: {a0:.4f} → {a2:.4f} ({a0 - a2:.4f})" in text
    assert (folder / "drop_vs_length.png").exists()


def test_the_undelayed_reference_stays_when_sgdm_splits():
    import matplotlib.pyplot as plt

    from abexp.figures.common import add_series, undelayed_references

    table = pd.DataFrame({"optim.name": ["sgdm"] * 4 + ["ab"] * 2, "optim.nesterov": [False, False, True, True, False, False],
                          "delay.steps": [0, 8, 0, 8, 0, 8], "seed": 0, "acc": [0.9, 0.5, 0.8, 0.4, 0.9, 0.7]})
    series = add_series(table)
    assert list(series) == ["SGDM", "SGDM + Nesterov", "AB"]
    fig, ax = plt.subplots()
    undelayed_references(ax, table, series)
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()}
    assert lines == {"SGDM, no delay (0.900)": 0.9, "SGDM + Nesterov, no delay (0.800)": 0.8}
    plt.close(fig)


def test_the_staleness_figure_counts_each_traces_delays(tmp_path):
    """Two fake async runs' trace.txt files: the figure's data are their delays counted by hand."""
    import pandas as pd

    from abexp.figures import staleness
    runs = tmp_path / "runs"
    traces = {"a": [0, 1, 1, 1, 4], "b": [0, 1, 2, 1]}
    for rid, delays in traces.items():
        (runs / rid).mkdir(parents=True)
        (runs / rid / "trace.txt").write_text("# header\n" + "".join(f"{d} {j}  # worker 1 0.1\n" for j, d in enumerate(delays)))
    pd.DataFrame([{"run_id": rid, "status": "completed", "delay.kind": "async", "delay.workers": 2,
                   "delay.order": "arrival", "optim.name": "sgdm", "seed": i, "experiment": "e"}
                  for i, rid in enumerate(traces)]).to_csv(tmp_path / "runs.csv", index=False)
    staleness.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figs")])
    data = pd.read_csv(tmp_path / "figs" / "staleness.csv")
    assert data.groupby("staleness")["updates"].sum().to_dict() == {0: 2, 1: 5, 2: 1, 4: 1}
    assert (tmp_path / "figs" / "staleness.png").exists()


def test_tuned_lr_picks_each_optimizers_best_lr_per_delay_by_hand(tmp_path):
    """A hand-made table: the tuned cell is the lr with the best seed-mean (diverged = 0), among
    lrs with the most seeds; its edge is marked; the every-lr table keeps each mean."""
    from abexp.figures import tuned_lr
    acc = {  # (optimizer, delay, lr): per-seed accuracy, None = diverged
        ("sgdm", 0, 0.1): [0.90, 0.92], ("sgdm", 0, 0.2): [0.93, 0.95], ("sgdm", 0, 0.4): [0.99, None],
        ("sgdm", 8, 0.05): [0.99], ("sgdm", 8, 0.1): [0.80, 0.84], ("sgdm", 8, 0.2): [0.81, 0.81],
        ("sgdm", 8, 0.4): [0.95],
        ("ab", 8, 0.1): [0.70, 0.70], ("ab", 8, 0.2): [0.88, 0.86], ("ab", 8, 0.4): [0.87, 0.89],
    }
    rows = [{"run_id": f"r{i}", "experiment": "e", "status": "completed" if a is not None else "diverged",
             "test_acc": a, "optim.name": o, "delay.steps": d, "optim.lr": lr, "seed": s, "delay.kind": "constant"}
            for i, ((o, d, lr), accs) in enumerate(acc.items()) for s, a in enumerate(accs)]
    rows = [dict(r, run_id=f"{r['run_id']}_{k}") for k, r in enumerate(rows)]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    tuned_lr.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figs")])
    tuned = pd.read_csv(tmp_path / "figs" / "tuned_lr.csv").set_index(["series", "delay"])
    # sgdm D=0: 0.4 has a mean of (0.99 + 0) / 2 with the diverged seed at 0, so 0.2 wins
    assert tuned.loc[("SGDM", 0), "lr"] == 0.2 and tuned.loc[("SGDM", 0), "mean"] == pytest.approx(0.94)
    # sgdm D=8: 0.05 and 0.4 have one seed of two, so they wait; 0.1 (0.82) beats 0.2 (0.81): the
    # low edge of the lrs compared (not of the grid: 0.05 was not compared)
    assert tuned.loc[("SGDM", 8), "lr"] == 0.1 and tuned.loc[("SGDM", 8), "edge"] == "low"
    assert tuned.loc[("SGDM", 8), "lrs_compared"] == 2
    assert tuned.loc[("AB", 8), "lr"] == 0.4 and tuned.loc[("AB", 8), "edge"] == "high"
    assert tuned.loc[("AB", 8), "sd"] == pytest.approx(pd.Series([0.87, 0.89]).std())
    text = (tmp_path / "figs" / "tuned_lr.md").read_text()
    # each delay's grid is the lrs run there: 3 at D = 0 (all compared), 4 at D = 8
    assert tuned.loc[("SGDM", 0), "lrs_in_grid"] == 3 and tuned.loc[("SGDM", 8), "lrs_in_grid"] == 4
    assert "from the grid {0.1, 0.2, 0.4} at D = 0 and {0.05, 0.1, 0.2, 0.4} at D = 8 (" in text
    assert "| SGDM | 0.940 ± 0.014 @ 0.2 | 0.820 ± 0.028 @ 0.1↓, 2 of 4 lrs |" in text
    assert "| AB | – | 0.880 ± 0.014 @ 0.4↑, 3 of 4 lrs |" in text
    assert "–: no finished run" in text  # AB has no D = 0 cell
    assert "| AB | 0.1 | – | 0.700 ± 0.000 |" in text
    assert (tmp_path / "figs" / "tuned_lr.png").exists()
    # one delay, one grid: said once
    pd.DataFrame([r for r in rows if r["delay.steps"] == 8]).to_csv(tmp_path / "d8.csv", index=False)
    tuned_lr.main(["--table", str(tmp_path / "d8.csv"), "--out", str(tmp_path / "d8")])
    assert "best lr per delay from the grid {0.05, 0.1, 0.2, 0.4} (chosen" in (tmp_path / "d8" / "tuned_lr.md").read_text()


def test_a_confirmation_stages_extra_seeds_report_but_do_not_select(tmp_path):
    """Two stages: every lr on seeds 0, 1, then seeds 2, 3 at one lr. The lrs compete on seeds
    0 and 1 alone (validation), all three of them; the winner's cell reports all its seeds."""
    from abexp.figures import tuned_lr

    def tuned(val, test, name):
        rows = [{"run_id": f"r{lr}_{s}", "experiment": "e", "status": "completed", "val_acc": v,
                 "test_acc": test[lr][s], "optim.name": "sgdm", "delay.steps": 8, "optim.lr": lr, "seed": s,
                 "delay.kind": "constant"} for lr, vals in val.items() for s, v in enumerate(vals)]
        pd.DataFrame(rows).to_csv(tmp_path / f"{name}.csv", index=False)
        tuned_lr.main(["--table", str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / name)])
        return pd.read_csv(tmp_path / name / "tuned_lr.csv").iloc[0]

    val = {0.05: [0.80, 0.80, 0.99, 0.99], 0.1: [0.85, 0.83], 0.2: [0.70, 0.72]}  # per seed 0, 1, (2, 3)
    test = {0.05: [0.81, 0.79, 0.95, 0.97], 0.1: [0.84, 0.86], 0.2: [0.71, 0.69]}
    cell = tuned(val, test, "first")
    # on seeds 0, 1: 0.05 scores 0.80, 0.1 0.84, 0.2 0.71; 0.05's later seeds (0.99) do not count
    assert cell["lr"] == 0.1 and cell["selection_seeds"] == "0 1"
    assert cell["selection_score"] == pytest.approx(0.84) and cell["lrs_compared"] == 3
    assert pd.isna(cell["edge"]) and cell["mean"] == pytest.approx(0.85) and cell["seeds"] == 2  # inside the grid
    # had 0.1 been the confirmed lr, its cell would report its 4 seeds, still selected on 0 and 1
    val[0.1] += [0.50, 0.50]
    test[0.1] += [0.90, 0.92]
    del val[0.05][2:], test[0.05][2:]
    cell = tuned(val, test, "confirmed")
    assert cell["lr"] == 0.1 and cell["seeds"] == 4 and cell["mean"] == pytest.approx((0.84 + 0.86 + 0.90 + 0.92) / 4)
    assert "| SGDM | 0.880 ± 0.037 @ 0.1 |" in (tmp_path / "confirmed" / "tuned_lr.md").read_text()


def test_an_experiment_name_holding_a_path_draws_inside_the_figures_folder(tmp_path):
    """A study or experiment name is never a path: a sweep run with --set data.root=../../x
    carries that in its name, and --experiment takes whatever the user types."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    res = tmp_path / "a" / "b" / "r"
    (res / "sweeps").mkdir(parents=True)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(res / "sweeps" / "x.journal")))
    study = optuna.create_study(study_name="../../escaped", storage=storage, direction="maximize")
    for lr in (0.01, 0.02, 0.05):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("optim.lr", 0.01, 0.1, log=True) * 10 * lr)
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(res)}
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "figures", "--results", str(res),
                           "--experiment", "../../escaped"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(res)} == before  # nothing outside
    drawn = res / "figures" / "%2E.%2F..%2Fescaped"
    assert (drawn / "sweep_history.png").stat().st_size > 0


def test_test_selection_compares_full_precision_means(tmp_path):
    """Without validation the test values select: 0.2's mean beats 0.1's by 1.5e-5, below the
    4 decimals a table prints, and still wins."""
    from abexp.figures import tuned_lr
    acc = {0.1: [0.90615, 0.90616], 0.2: [0.906175, 0.906165], 0.05: [0.5, 0.5]}
    rows = [{"run_id": f"r{lr}_{s}", "experiment": "e", "status": "completed", "test_acc": a, "optim.name": "sgdm",
             "delay.steps": 8, "optim.lr": lr, "seed": s, "delay.kind": "constant"}
            for lr, accs in acc.items() for s, a in enumerate(accs)]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    tuned_lr.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figs")])
    assert pd.read_csv(tmp_path / "figs" / "tuned_lr.csv").iloc[0]["lr"] == 0.2


def test_the_brake_of_one_stage_pipeline_runs_lent_to_d0_keeps_every_epoch(tmp_path):
    """A study whose constant delays have no D = 0 borrows the pipeline's S = 1 runs for it
    (common.undelayed_from_pipeline); a per-epoch table must keep each of their epochs."""
    from abexp.figures import brake
    rows = []
    for kind, stages, steps in (("pipeline", 1, 0), ("pipeline", 2, 0), ("constant", None, 4)):
        for seed in (0, 1):
            for epoch, factor in ((1, 0.5), (2, 0.9)):
                rows.append({"run_id": f"{kind}{stages}{seed}", "experiment": "e", "status": "completed",
                             "optim.name": "ab", "optim.lr": 0.1, "seed": seed, "delay.kind": kind,
                             "delay.stages": stages, "delay.steps": steps, "epoch": epoch,
                             "brake_mean": factor + 0.01 * seed, "brake_sd": 0.2})
    pd.DataFrame(rows).to_csv(tmp_path / "epochs.csv", index=False)
    brake.main(["--table", str(tmp_path / "epochs.csv"), "--out", str(tmp_path / "figs")])
    table = pd.read_csv(tmp_path / "figs" / "brake_table.csv").set_index("delay")
    assert table.loc[0, "epochs"] == 2 and table.loc[0, "first_mean"] == pytest.approx(0.505)
    assert table.loc[0, "last_mean"] == pytest.approx(0.905) and table.loc[4, "last_mean"] == pytest.approx(0.905)
    stages = pd.read_csv(tmp_path / "figs" / "brake_stages_table.csv").set_index("delay")
    assert sorted(stages.index) == [1, 2] and stages.loc[1, "all_mean"] == pytest.approx(0.705)
