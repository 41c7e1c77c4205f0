"""abexp confirm: the written spec runs the new seeds at exactly the lrs validation selected,
with the run ids the study's own spec gives those runs (checked against a hand-written spec),
and refuses to select from a grid whose selecting seed has not finished."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from abexp.config import ConfigError
from abexp.lab import collect as collect_module
from abexp.figures.confirm import write_confirm_spec
from abexp.lab.spec import load_spec
from conftest import collected_columns

ROOT = Path(__file__).resolve().parents[1]

STUDY = """name: lm_study
base:
  model: {name: gpt, layers: 1, width: 8, heads: 2}
  data: {name: shakespeare, context: 8, subset: 64}
  train: {epochs: 1, batch_size: 4}
variants:
  pipeline: {delay.kind: pipeline, grid: {delay.stages: [1, 4]}}
  constant: {delay.kind: constant, grid: {delay.steps: [4]}}
grid:
  seed: SEEDS
  optim.name: [adamw, muon]
  optim.lr: [0.001, 0.01, 0.1]
exclude:
  - {optim.lr: 0.1, optim.name: adamw}
"""

# the lr validation should pick per (variant, stage count or delay, optimizer): validation loss 1.0
# there, 2.0 elsewhere, and test loss that prefers another lr (so a test-selected table would differ)
CHOSEN = {("pipeline", 1, "adamw"): 0.01, ("pipeline", 1, "muon"): 0.1,
          ("pipeline", 4, "adamw"): 0.001, ("pipeline", 4, "muon"): 0.01,
          ("constant", 4, "adamw"): 0.001, ("constant", 4, "muon"): 0.001}


def cell(run) -> tuple:
    level = run.config.delay.stages if run.config.delay.kind == "pipeline" else run.config.delay.steps
    return (run.config.variant, level, run.config.optim.name)


def finished_table(plan, unfinished: int = 0) -> pd.DataFrame:
    rows = []
    for run in plan[unfinished:]:
        picked = CHOSEN[cell(run)] == run.config.optim.lr
        rows.append({"run_id": run.run_id, "status": "completed", **collected_columns(run.config),
                     "val_loss": 1.0 if picked else 2.0, "test_loss": 3.0 if picked else 2.5})
    return pd.DataFrame(rows)


def study(tmp_path, seeds: str) -> Path:
    path = tmp_path / "experiments" / f"study_{seeds.strip('[]').replace(', ', '_')}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(STUDY.replace("SEEDS", seeds))
    return path


def test_the_written_spec_runs_new_seeds_at_the_validation_selected_lrs(tmp_path, monkeypatch):
    spec = study(tmp_path, "[0, 1, 2]")  # the study plans 3 seeds; only seed 0 has run: it selects
    plan = load_spec(spec).expand()
    monkeypatch.setattr(collect_module, "collect",
                        lambda results: finished_table([r for r in plan if r.config.seed == 0]))
    out = tmp_path / "experiments" / "lm_study_confirm.yaml"
    ids = write_confirm_spec(spec, "unused", [1, 2], out)

    # the reference: the study's own spec at seeds 1 and 2, kept where the hand-chosen lr is
    wide = load_spec(study(tmp_path, "[1, 2]")).expand()
    meant = sorted(r.run_id for r in wide if CHOSEN[cell(r)] == r.config.optim.lr)
    assert sorted(ids) == meant and len(meant) == 2 * 6
    written = load_spec(out)
    assert sorted(r.run_id for r in written.expand()) == meant
    assert written.name == "lm_study" and written.grid == {"seed": [1, 2]}
    # the selection is recorded, validation named as what chose it
    assert "S = 4: Muon at lr 0.01, mean val_loss 1.0000 over seeds 0" in written.description
    assert "D = 4: AdamW at lr 0.001" in written.description
    # the undelayed runs are chosen once, though the constant delays borrow them as D = 0
    assert len([r for r in written.expand() if r.config.delay.kind == "pipeline"
                and r.config.delay.stages == 1]) == 2 * 2


def test_a_studys_committed_rows_select_as_its_results_folder_does(tmp_path, monkeypatch):
    """On a machine without the results folder, the rows file (analysis/study_rows.py) selects:
    the same spec, but for the line that says where the runs were read."""
    spec = study(tmp_path, "[0, 1]")
    plan = [r for r in load_spec(spec).expand() if r.config.seed == 0]
    monkeypatch.setattr(collect_module, "collect", lambda results: finished_table(plan))
    from_folder = write_confirm_spec(spec, "unused", [1], tmp_path / "a.yaml")
    rows = tmp_path / "rows.csv"
    finished_table(plan).to_csv(rows, index=False)
    monkeypatch.setattr(collect_module, "collect", lambda results: pytest.fail("the rows file alone must do"))
    from_rows = write_confirm_spec(spec, str(rows), [1], tmp_path / "b.yaml")
    assert from_rows == from_folder and len(from_rows) == 6
    text_a, text_b = ((tmp_path / n).read_text().replace("unused", str(rows)) for n in ("a.yaml", "b.yaml"))
    assert text_a == text_b
    with pytest.raises(ConfigError, match="no such rows file"):
        write_confirm_spec(spec, str(tmp_path / "absent.csv"), [1], tmp_path / "c.yaml")
    assert not (tmp_path / "c.yaml").exists()


def test_selecting_before_the_grid_has_finished_is_refused(tmp_path, monkeypatch):
    spec = study(tmp_path, "[0]")
    plan = load_spec(spec).expand()
    monkeypatch.setattr(collect_module, "collect", lambda results: finished_table(plan, unfinished=1))
    out = tmp_path / "confirm.yaml"
    with pytest.raises(ConfigError, match="1 planned runs at the selecting seeds"):
        write_confirm_spec(spec, "unused", [1, 2], out)
    assert not out.exists()  # nothing half-written
    assert write_confirm_spec(spec, "unused", [1], out, allow_partial=True)  # asked for: allowed


def test_the_cli_says_one_line_and_exits_2_without_runs(tmp_path):
    spec = study(tmp_path, "[0]")
    (tmp_path / "results" / "runs").mkdir(parents=True)
    out = tmp_path / "confirm.yaml"
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "confirm", str(spec), "--results",
                           str(tmp_path / "results"), "--seeds", "1", "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.count("\n") == 1 and "no runs of" in proc.stderr


def test_a_study_without_variants_keeps_its_exclusions_and_its_own_spec(tmp_path, monkeypatch):
    spec = tmp_path / "flat.yaml"
    spec.write_text("""name: flat
base:
  model: {name: gpt, layers: 1, width: 8, heads: 2}
  data: {name: shakespeare, context: 8, subset: 64}
grid:
  seed: [0]
  optim.name: [adamw, muon]
  delay.steps: [0, 4]
  optim.lr: [0.001, 0.01]
exclude:
  - {optim.name: muon, delay.steps: 4, seed: 2}
""")
    plan = load_spec(spec).expand()
    chosen = {("adamw", 0): 0.01, ("adamw", 4): 0.001, ("muon", 0): 0.001, ("muon", 4): 0.01}
    rows = []
    for run in plan:
        picked = chosen[(run.config.optim.name, run.config.delay.steps)] == run.config.optim.lr
        rows.append({"run_id": run.run_id, "status": "completed", **collected_columns(run.config),
                     "val_loss": 1.0 if picked else 2.0, "test_loss": 1.5})
    monkeypatch.setattr(collect_module, "collect", lambda results: pd.DataFrame(rows))
    with pytest.raises(ConfigError, match="the study's own spec"):
        write_confirm_spec(spec, "unused", [1, 2], spec)  # would overwrite what it extends
    out = tmp_path / "flat_confirm.yaml"
    ids = write_confirm_spec(spec, "unused", [1, 2], out)
    written = load_spec(out).expand()
    got = sorted((r.config.optim.name, r.config.delay.steps, r.config.optim.lr, r.config.seed) for r in written)
    # the exclusion holds for the new seeds: Muon at D = 4 runs seed 1 only
    assert got == sorted([(o, d, lr, s) for (o, d), lr in chosen.items() for s in (1, 2)
                          if (o, d, s) != ("muon", 4, 2)])
    assert sorted(ids) == sorted(r.run_id for r in written)


@pytest.mark.parametrize("study, rows", [
    ("fashion_mnist_evidence", "fashion_mnist_evidence_runs.csv"),
    ("fashion_mnist_evidence_dcasgd", "fashion_mnist_evidence_runs.csv"),
    ("shakespeare_gpt", "shakespeare_gpt_runs.csv"),
])
def test_each_committed_confirmation_spec_is_what_the_committed_rows_select(tmp_path, study, rows):
    """A committed second stage (written once, from a results folder on the machine that ran the
    first) runs exactly the runs `abexp confirm` selects today from the first stage's committed rows."""
    committed = ROOT / "experiments" / f"{study}_confirm.yaml"
    runs = load_spec(committed).expand(warn=lambda msg: None)
    seeds = sorted({run.config.seed for run in runs})
    out = tmp_path / "experiments" / committed.name
    out.parent.mkdir()
    first_stage = pd.read_csv(ROOT / "results" / rows, dtype={"run_id": str})
    first_stage = first_stage[~first_stage["seed"].isin(seeds)]  # as the rows stood when it was written
    first_stage.to_csv(tmp_path / "rows.csv", index=False)
    ids = write_confirm_spec(ROOT / "experiments" / f"{study}.yaml", tmp_path / "rows.csv", seeds, out)
    assert sorted(ids) == sorted(run.run_id for run in runs)
