"""`abexp run --done-rows`: runs another machine finished (their committed rows) are not run again."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from abexp.config import ConfigError
from abexp.lab import elsewhere
from abexp.lab.runner import runs_dir
from abexp.lab.slurm import Request, script_text
from abexp.lab.spec import load_spec
from test_runner import ENV, abexp_run, assert_each_run_once, write_spec

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path, rows: list[dict], columns=("run_id", "experiment", "status", "test_acc")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_finished_rows_are_the_completed_and_diverged_ones(tmp_path):
    rows = write_rows(tmp_path / "rows.csv", [
        {"run_id": "a", "status": "completed"}, {"run_id": "b", "status": "diverged"},
        {"run_id": "c", "status": "failed"}, {"run_id": "d", "status": "running"}])
    assert elsewhere.read_finished_ids(rows) == {"a", "b"}
    # rows written before the status column existed held completed runs only (analysis/study_rows.py)
    old = write_rows(tmp_path / "old.csv", [{"run_id": "e"}, {"run_id": "f"}], columns=("run_id", "test_acc"))
    assert elsewhere.read_finished_ids(old) == {"e", "f"}


def test_the_rows_files_reach_every_process_through_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(elsewhere.ENV, raising=False)
    one = write_rows(tmp_path / "one.csv", [{"run_id": "a", "status": "completed"}])
    two = write_rows(tmp_path / "two.csv", [{"run_id": "b", "status": "diverged"}])
    monkeypatch.chdir(tmp_path)
    elsewhere.remember(["one.csv"])
    elsewhere.remember(["two.csv", "one.csv"])  # named twice: listed once, absolute
    assert elsewhere.ENV in __import__("os").environ
    assert elsewhere.finished_elsewhere() == {"a", "b"}
    script = script_text(Request(), ["w"], Path("/f"), "x")  # a SLURM task's worker plans the same runs
    assert f"export {elsewhere.ENV}=" in script and str(one) in script and str(two) in script


def test_a_new_machine_runs_only_what_the_committed_rows_lack(tmp_path):
    spec = write_spec(tmp_path / "study.yaml", epochs=1, seeds=(0, 1))
    plan = load_spec(spec).expand()
    seed0 = [r.run_id for r in plan if r.config.seed == 0]
    seed1 = [r.run_id for r in plan if r.config.seed == 1]
    # the rows the other machine committed: seed 0 finished there (one of them diverged), seed 1
    # was still running when it went away
    rows = write_rows(tmp_path / "study_runs.csv",
                      [{"run_id": seed0[0], "status": "completed"}, {"run_id": seed0[1], "status": "diverged"}]
                      + [{"run_id": rid, "status": "running"} for rid in seed1])
    results = tmp_path / "results"
    rc, out, err = abexp_run(spec, results, "--workers", "1", "--done-rows", str(rows))
    assert rc == 0, err
    assert f"2 of {len(plan)} runs finished elsewhere" in err
    trained = {d.name for d in runs_dir(results).iterdir() if (d / "result.json").exists()}
    assert trained == set(seed1)
    assert not any((runs_dir(results) / rid).exists() for rid in seed0)  # not even claimed
    status = subprocess.run([sys.executable, "-m", "abexp.cli", "status", str(spec), "--results", str(results),
                             "--done-rows", str(rows)], env=ENV, capture_output=True, text=True, cwd=ROOT)
    lines = status.stdout.strip().splitlines()
    assert lines[-1] == f"2 completed, 2 elsewhere ({len(plan)} runs)", status.stdout
    assert sorted(line.split()[0] for line in lines[:-1] if line.split()[1] == "elsewhere") == sorted(seed0)
    # run again: nothing left to do here, nothing trained twice
    rc, out, _ = abexp_run(spec, results, "--workers", "1", "--done-rows", str(rows))
    assert rc == 0 and f"all {len(seed1)} runs of" in out
    # without the rows file the same command runs the rest, each run once
    rc, out, err = abexp_run(spec, results, "--workers", "1")
    assert rc == 0, err
    assert_each_run_once(spec, results, epochs=1)


def test_every_run_finished_elsewhere_is_nothing_to_do(tmp_path):
    spec = write_spec(tmp_path / "study.yaml", epochs=1, seeds=(0,))
    rows = write_rows(tmp_path / "rows.csv", [{"run_id": r.run_id, "status": "completed"}
                                              for r in load_spec(spec).expand()])
    rc, out, err = abexp_run(spec, tmp_path / "results", "--done-rows", str(rows))
    assert rc == 0, err
    assert "nothing to run here" in out and not runs_dir(tmp_path / "results").exists()


@pytest.mark.parametrize("make_rows, names", [
    (lambda d: d / "missing.csv", ["--done-rows", "missing.csv"]),
    (lambda d: write_rows(d / "notrows.csv", [{"id": "a"}], columns=("id", "status")), ["notrows.csv", "run_id"]),
])
def test_a_bad_rows_file_is_one_line_and_nothing_written(tmp_path, make_rows, names):
    spec = write_spec(tmp_path / "study.yaml", epochs=1, seeds=(0,))
    rows = make_rows(tmp_path)
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "run", str(spec), "--results", str(results),
                           "--done-rows", str(rows)], env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in names), proc.stderr
    assert not results.exists()
    with pytest.raises(ConfigError):
        elsewhere.read_finished_ids(rows)
