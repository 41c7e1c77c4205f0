"""analysis/study_rows.py: a long study's finished runs become committed rows, each exactly once,
with the code and CPU that made it; a language model's rows carry losses, not accuracies."""

import importlib.util
import sys
from pathlib import Path

import pandas as pd

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
