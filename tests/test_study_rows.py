"""analysis/study_rows.py: a long study's finished runs become committed rows, each exactly once,
with the code and CPU that made it; a language model's rows carry losses, not accuracies."""

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_module():
    sys.path.insert(0, str(ROOT / "analysis"))
    spec = importlib.util.spec_from_file_location("study_rows", ROOT / "analysis" / "study_rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_new_finished_runs_are_appended_once_and_old_rows_kept(tmp_path, monkeypatch):
    rows = load_module()
    runs = [{"run_id": "a", "status": "completed", "experiment": "e", "variant": "pipeline", "seed": 0,
             "optim.name": "muon", "optim.lr": 0.01, "delay.kind": "pipeline", "delay.stages": 8, "delay.steps": 0,
             "steps": 2000, "val_loss": 2.0, "test_loss": 2.1, "val_acc": 0.4, "test_acc": 0.4, "wall_s": 80.0,
             "data.name": "shakespeare"}]
    runs.append({**runs[0], "run_id": "b", "optim.name": "adamw", "val_loss": 1.9, "test_loss": 1.95})
    runs.append({**runs[0], "run_id": "c", "status": "running"})  # not finished: no row yet
    monkeypatch.setattr(rows, "collect", lambda results: pd.DataFrame(runs))
    monkeypatch.setattr(rows, "cpu_kind", lambda: ("Test CPU", "AVX"))
    out = tmp_path / "rows.csv"
    out.write_text("run_id,experiment,variant,seed,optim.name,optim.lr,delay.kind,delay.stages,delay.steps,steps,"
                   "val_loss,test_loss,wall_s,code,cpu\n"
                   "a,e,pipeline,0,muon,0.01,pipeline,8,0,2000,2.5,2.6,99.0,old1234,Other CPU\n")
    assert rows.main(["--results", "unused", "--code", "abc1234", "-o", str(out)]) == 0
    table = pd.read_csv(out).set_index("run_id")
    assert sorted(table.index) == ["a", "b"]  # c is not finished; a is not summarised again
    assert table.loc["a", "test_loss"] == 2.6 and table.loc["a", "code"] == "old1234"  # kept as it was
    assert table.loc["b", "test_loss"] == 1.95 and table.loc["b", "code"] == "abc1234"
    assert table.loc["b", "cpu"] == "Test CPU (AVX)" and "test_acc" not in table.columns
    assert rows.main(["--results", "unused", "--code", "abc1234", "-o", str(out)]) == 0
    assert len(pd.read_csv(out)) == 2  # a second pass adds nothing


def test_a_classifiers_rows_carry_accuracies(tmp_path, monkeypatch):
    rows = load_module()
    run = {"run_id": "x", "status": "completed", "experiment": "f", "seed": 1, "optim.name": "ab", "optim.lr": 0.05,
           "delay.steps": 32, "data.val_split": 0.1, "steps": 5061, "val_acc": 0.88, "test_acc": 0.87,
           "val_loss": 0.3, "test_loss": 0.31, "wall_s": 300.0, "data.name": "fashion_mnist"}
    monkeypatch.setattr(rows, "collect", lambda results: pd.DataFrame([run]))
    monkeypatch.setattr(rows, "cpu_kind", lambda: ("Test CPU", "AVX"))
    out = tmp_path / "rows.csv"
    assert rows.main(["--results", "unused", "--code", "abc1234", "-o", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == rows.COLUMNS + ["code", "cpu"] and table.loc[0, "test_acc"] == 0.87


def test_diverged_runs_get_rows_and_old_rows_gain_status_and_dataset(tmp_path, monkeypatch):
    rows = load_module()
    base = {"experiment": "e", "variant": "constant", "seed": 0, "optim.name": "muon", "optim.lr": 0.1,
            "delay.kind": "constant", "delay.stages": None, "delay.steps": 16, "steps": 2000,
            "data.name": "shakespeare", "wall_s": 50.0}
    runs = [{**base, "run_id": "a", "status": "completed", "val_loss": 2.0, "test_loss": 2.1},
            {**base, "run_id": "d", "status": "diverged", "optim.lr": 0.3, "val_loss": None, "test_loss": None}]
    monkeypatch.setattr(rows, "collect", lambda results: pd.DataFrame(runs))
    monkeypatch.setattr(rows, "cpu_kind", lambda: ("Test CPU", "AVX"))
    out = tmp_path / "rows.csv"  # written before status and data.name were columns
    out.write_text("run_id,experiment,variant,seed,optim.name,optim.lr,delay.kind,delay.stages,delay.steps,steps,"
                   "val_loss,test_loss,wall_s,code,cpu\n"
                   "a,e,constant,0,muon,0.1,constant,,16,2000,2.0,2.1,50.0,old1234,Other CPU\n")
    assert rows.main(["--results", "unused", "--code", "abc1234", "-o", str(out)]) == 0
    table = pd.read_csv(out).set_index("run_id")
    assert table.loc["a", "status"] == "completed" and table.loc["a", "data.name"] == "shakespeare"
    assert table.loc["a", "code"] == "old1234"  # still the row it was
    assert table.loc["d", "status"] == "diverged"  # a result (the worst), not a gap
    assert list(table.reset_index().columns) == rows.LM_COLUMNS + ["code", "cpu"]


def test_the_tables_redrawn_from_the_rows_equal_those_from_the_results_table(tmp_path, monkeypatch):
    """The committed rows carry everything the study's tables read: tuned_lr and paired drawn
    from them (analysis/study_tables.py) equal the same modules drawn from the full results table
    (every config column, as abexp collect writes it)."""
    from abexp.figures import paired, tuned_lr
    from abexp.lab.spec import load_spec
    from conftest import collected_columns

    spec = tmp_path / "study.yaml"
    spec.write_text("""name: lm_rows
base:
  model: {name: gpt, layers: 2, width: 8, heads: 2}
  data: {name: shakespeare, context: 8, subset: 64}
variants:
  pipeline: {delay.kind: pipeline, grid: {delay.stages: [1, 2]}}
  constant: {delay.kind: constant, grid: {delay.steps: [4]}}
grid:
  seed: [0, 1, 2]
  optim.name: [adamw, muon]
  optim.lr: [0.001, 0.01]
""")
    full = []
    for i, run in enumerate(load_spec(spec).expand()):
        loss = 2.0 + ((i * 37) % 11) / 20  # arbitrary but fixed losses
        full.append({"run_id": run.run_id, "status": "diverged" if i == 5 else "completed", "experiment": "lm_rows",
                     "variant": run.config.variant, **collected_columns(run.config), "steps": 100, "wall_s": 1.0,
                     "val_loss": None if i == 5 else loss, "test_loss": None if i == 5 else loss + 0.03})
    pd.DataFrame(full).to_csv(tmp_path / "runs.csv", index=False)
    rows = load_module()
    monkeypatch.setattr(rows, "collect", lambda results: pd.DataFrame(full))
    monkeypatch.setattr(rows, "cpu_kind", lambda: ("Test CPU", "AVX"))
    assert rows.main(["--results", "unused", "--code", "abc1234", "-o", str(tmp_path / "rows.csv")]) == 0

    sys.path.insert(0, str(ROOT / "analysis"))
    import study_tables
    drawn = study_tables.draw("lm_rows", study_tables.Study(str(tmp_path / "rows.csv"), "adamw", ("muon",)), tmp_path / "out")
    reference = tmp_path / "reference"
    tuned_lr.main(["--table", str(tmp_path / "runs.csv"), "--out", str(reference)])
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(reference), "--baseline", "adamw"])
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(reference / "vs_muon"), "--baseline", "muon"])
    tables = sorted(p.name for p in drawn if p.suffix == ".md")
    assert tables == sorted(f"lm_rows_{t}.md" for t in (
        "tuned_lr", "tuned_lr_stages", "paired", "paired_stages", "paired_cost", "paired_cost_stages",
        "paired_vs_muon", "paired_stages_vs_muon", "paired_cost_vs_muon", "paired_cost_stages_vs_muon"))
    for name in tables:
        theirs = name.removeprefix("lm_rows_")
        theirs = f"vs_muon/{theirs.replace('_vs_muon', '')}" if "vs_muon" in theirs else theirs
        assert (tmp_path / "out" / name).read_text() == (reference / theirs).read_text()
    # a study listed before its first row is committed draws nothing, and says so
    out = tmp_path / "none"
    assert study_tables.draw("later", study_tables.Study(str(tmp_path / "absent.csv"), "sgdm"), out) == []
    assert not out.exists() or not any(out.iterdir())


def test_a_classifiers_old_rows_gain_their_runs_delay_kind_and_stages(tmp_path, monkeypatch):
    rows = load_module()
    run = {"run_id": "p", "status": "completed", "experiment": "d", "seed": 0, "optim.name": "lwp", "optim.lr": 0.01,
           "delay.kind": "pipeline", "delay.stages": 8, "delay.steps": 0, "steps": 712, "test_acc": 0.9,
           "wall_s": 30.0, "data.name": "digits"}
    monkeypatch.setattr(rows, "collect", lambda results: pd.DataFrame([run]))
    monkeypatch.setattr(rows, "cpu_kind", lambda: ("Test CPU", "AVX"))
    out = tmp_path / "rows.csv"  # written before delay.kind and delay.stages were columns
    out.write_text("run_id,experiment,seed,optim.name,optim.lr,delay.steps,steps,test_acc,wall_s,code,cpu\n"
                   "p,d,0,lwp,0.01,0,712,0.9,30.0,old1234,Other CPU\n")
    assert rows.main(["--results", "unused", "--code", "abc1234", "-o", str(out)]) == 0
    table = pd.read_csv(out)
    assert table.loc[0, "delay.kind"] == "pipeline" and table.loc[0, "delay.stages"] == 8
    assert table.loc[0, "status"] == "completed" and table.loc[0, "code"] == "old1234" and len(table) == 1
    monkeypatch.setattr(rows, "collect", lambda results: pd.DataFrame(columns=["run_id"]))
    out.write_text("run_id,experiment,seed,optim.name,optim.lr,delay.steps,steps,test_acc,wall_s,code,cpu\n"
                   "p,d,0,lwp,0.01,0,712,0.9,30.0,old1234,Other CPU\n")
    with pytest.raises(SystemExit, match="not"):  # its run is not in this results folder: refused
        rows.main(["--results", "elsewhere", "--code", "abc1234", "-o", str(out)])
    assert "delay.kind" not in out.read_text()  # nothing half-written


def test_a_study_drawn_from_shared_rows_reads_only_its_specs_runs(tmp_path):
    """Two specs' runs in one rows file (an ablation beside its study): a study limited to one
    spec draws exactly what that spec's rows alone give."""
    from abexp.figures import paired
    from abexp.lab.spec import load_spec

    sys.path.insert(0, str(ROOT / "analysis"))
    import study_tables

    base = "base: {model: {name: resnet8}, data: {name: digits}}\n"
    main = tmp_path / "main.yaml"
    main.write_text("name: main\n" + base + "grid: {seed: [0, 1, 2], optim.name: [sgdm, ab], delay.steps: [8]}\n")
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text("name: ablation\n" + base + "grid: {seed: [0, 1, 2], optim.name: [ab], optim.rho: [1.0, 2.0], delay.steps: [8]}\n")
    rows, seen = [], set()
    for spec in (main, ablation):
        for i, run in enumerate(load_spec(spec).expand()):
            c = run.config
            if run.run_id in seen:  # the ablation's ρ 1 arm is the main spec's AB: one run, labelled by the first
                continue
            seen.add(run.run_id)
            rows.append({"run_id": run.run_id, "experiment": c.experiment, "status": "completed", "seed": c.seed,
                         "optim.name": c.optim.name, "optim.lr": c.optim.lr, "optim.rho": c.optim.rho,
                         "delay.kind": "constant", "delay.steps": c.delay.steps,
                         "test_acc": 0.5 + 0.1 * (c.optim.name == "ab") + 0.05 * (c.optim.rho == 2.0) + 0.01 * i})
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    later = str(tmp_path / "main_confirm.yaml")  # a later stage's spec, listed before it is written
    drawn = study_tables.draw("main", study_tables.Study(str(tmp_path / "rows.csv"), "sgdm", specs=(str(main), later)),
                              tmp_path / "out")
    assert [p.name for p in drawn] == ["main_paired.md"]
    pd.DataFrame([r for r in rows if r["experiment"] == "main"]).drop(columns="optim.rho").to_csv(tmp_path / "main.csv", index=False)
    paired.main(["--table", str(tmp_path / "main.csv"), "--out", str(tmp_path / "reference")])
    assert drawn[0].read_text() == (tmp_path / "reference" / "paired.md").read_text()
    assert "| 8 | AB |" in drawn[0].read_text() and "ρ" not in drawn[0].read_text()
    # the ablation, paired against its ρ 1 arm, which the main spec trained (another experiment label)
    drawn = study_tables.draw("ablation", study_tables.Study(str(tmp_path / "rows.csv"), "AB, ρ 1",
                                                             specs=(str(ablation),)), tmp_path / "out2")
    text = drawn[0].read_text()
    assert [p.name for p in drawn] == ["ablation_paired.md"] and "| 8 | AB, ρ 2 |" in text and "main" not in text
    assert "+0.0500 +0.0500 +0.0500" in text  # ρ 2 − ρ 1 per seed, as the made-up accuracies say


def test_ab_runs_per_epoch_brake_rows_are_written_once_and_old_configs_get_the_neutral_value(tmp_path, monkeypatch):
    """--epochs: the brake each AB run logged, per epoch, for the brake table; SGDM (no brake) has
    none; a second pass adds nothing. A run whose config predates optim.lwp_lookahead ran linear."""
    rows = load_module()
    base = {"status": "completed", "experiment": "f", "seed": 0, "optim.lr": 0.025, "delay.steps": 32,
            "data.val_split": 0.1, "steps": 5061, "val_acc": 0.8, "test_acc": 0.79, "wall_s": 300.0,
            "data.name": "fashion_mnist", "optim.rho": 1.0, "optim.ab_cosine": "tensor"}
    runs = pd.DataFrame([{**base, "run_id": "ab1", "optim.name": "ab", "optim.lwp_lookahead": "linear"},
                         {**base, "run_id": "sg1", "optim.name": "sgdm"}])  # sg1: from before the key
    logged = {"ab1": [{"epoch": 1, "train_loss": 0.9, "brake_mean": 0.37, "brake_sd": 0.22},
                      {"epoch": 2, "train_loss": 0.5, "brake_mean": 0.92, "brake_sd": 0.27}],
              "sg1": [{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.6}]}

    def epochs_of(results, table):
        return pd.DataFrame([{**e, "run_id": r} for r in table["run_id"] for e in logged[r]])
    monkeypatch.setattr(rows, "collect", lambda results: runs)
    monkeypatch.setattr(rows, "collect_epochs", epochs_of)
    monkeypatch.setattr(rows, "cpu_kind", lambda: ("Test CPU", "AVX"))
    out, per_epoch = tmp_path / "rows.csv", tmp_path / "epochs.csv"
    for _ in range(2):
        assert rows.main(["--results", "unused", "--code", "abc1234", "-o", str(out), "--epochs", str(per_epoch)]) == 0
    epochs = pd.read_csv(per_epoch)
    assert list(epochs.columns) == rows.EPOCH_COLUMNS and list(epochs["run_id"]) == ["ab1", "ab1"]
    assert list(epochs["brake_mean"]) == [0.37, 0.92] and list(epochs["brake_sd"]) == [0.22, 0.27]
    table = pd.read_csv(out).set_index("run_id")
    assert table.loc["sg1", "optim.lwp_lookahead"] == "linear" and len(table) == 2


def test_a_committed_table_the_rows_no_longer_give_is_called_stale(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "analysis"))
    import study_tables

    rows = tmp_path / "rows.csv"
    rows.write_text("run_id\n")
    monkeypatch.setattr(study_tables, "STUDIES", {"s": study_tables.Study(str(rows), "sgdm"),
                                                  "s_long": study_tables.Study(str(rows), "sgdm")})
    for name in ("s_paired.md", "s_tuned_lr.md", "s_long_paired.md", "s_runs.csv", "other_paired.md"):
        (tmp_path / name).write_text("x")
    written = [tmp_path / "s_paired.md"]
    assert study_tables.stale("s", written, tmp_path) == [tmp_path / "s_tuned_lr.md"]
    assert study_tables.stale("s_long", [], tmp_path) == [tmp_path / "s_long_paired.md"]


def test_every_studys_baselines_are_series_its_specs_runs_will_carry():
    """A baseline label with a typo would skip the study's paired table with one line, silently in
    make study-tables: each study limited to specs names only series that those specs' runs get
    (common.add_series on the rows study_rows would write for them, every run finished)."""
    from abexp.config import flatten
    from abexp.figures import common, paired
    from abexp.lab.spec import load_spec

    sys.path.insert(0, str(ROOT / "analysis"))
    import study_tables

    columns = load_module().COLUMNS
    checked = 0
    for name, study in study_tables.STUDIES.items():
        specs = [ROOT / s for s in study.specs if (ROOT / s).exists()]
        if not specs:
            continue
        runs = {r.run_id: flatten(r.config.model_dump()) for s in specs for r in load_spec(s).expand(warn=lambda m: None)}
        table = pd.DataFrame(list(runs.values())).reindex(columns=[c for c in columns if "." in c])
        series = common.add_series(table, axes=("delay.steps", "optim.lr"))
        # paired's own resolution: exits (skips the table) on a name that is not exactly one series
        found = paired.baseline_series(list(study_tables.baselines(study)), series, name)
        checked += len(found)
    assert checked >= 6  # the evidence study, its ablations' three arms, the DC-ASGD ablation, the brake control


def test_the_same_run_on_two_machines_is_joined_by_run_id_and_differenced():
    """analysis/evidence_across.py's CPU-kind rows equal a naive recomputation from the two
    committed rows files (the runs both hold, by run id), and its cross-machine pairs with stage 2's
    SGDM equal a by-seed join at SGDM's selected lr."""
    sys.path.insert(0, str(ROOT / "analysis"))
    import evidence_across
    lines = evidence_across.table()
    control = pd.read_csv(ROOT / "results/fashion_mnist_evidence_brake_schedule_runs.csv", dtype={"run_id": str})
    evidence = pd.read_csv(ROOT / "results/fashion_mnist_evidence_runs.csv", dtype={"run_id": str})
    both = control.merge(evidence, on="run_id")
    assert len(both) == 16 and set(both["optim.name_x"]) == {"ab"}
    for delay in (8, 32):
        cell = both[both["delay.steps_x"] == delay].sort_values("seed_x")
        diffs = [round(100 * (a - b), 2) for a, b in zip(cell["test_acc_x"], cell["test_acc_y"])]
        row = next(l for l in lines if l.startswith(f"| D = {delay}: the same ab runs"))
        assert [float(d) for d in row.split("|")[2].split()] == diffs
        mean = sum(100 * (a - b) for a, b in zip(cell["test_acc_x"], cell["test_acc_y"])) / len(cell)
        assert row.split("|")[3].strip() == f"{mean:+.2f}"
    sgdm = evidence[(evidence["optim.name"] == "sgdm") & (evidence["delay.steps"] == 32)
                    & (evidence["optim.lr"] == 0.0015625)].set_index("seed")["test_acc"]
    brake = control[(control["optim.name"] == "sgdm") & (control["delay.steps"] == 32)].set_index("seed")["test_acc"]
    row = next(l for l in lines if l.startswith("| D = 32: SGDM × AB's mean brake"))
    assert [float(d) for d in row.split("|")[2].split()] == [round(100 * (brake[s] - sgdm[s]), 2) for s in range(8)]
