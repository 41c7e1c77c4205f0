"""Damaged results and bad flags: one clear line naming the file or flag, the right exit code,
never a crash, never a partial run read as complete, and every other file byte-for-byte as it was."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from abexp.cli import main
from abexp.config import load_config
from abexp.lab.spec import load_spec
from abexp.train.run import CHECKPOINT
from abexp.train.start import train_run

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "experiments" / "digits_tiny.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """digits_tiny's 4 runs, trained once; each test damages its own copy."""
    root = tmp_path_factory.mktemp("finished")
    for run in load_spec(SPEC).expand(warn=lambda m: None):
        train_run(run.config, root / "runs" / run.run_id, device="cpu", log=lambda s: None)
    return root


@pytest.fixture
def results(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "results")
    return tmp_path / "results"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_run(results: Path) -> Path:
    return sorted((results / "runs").iterdir())[0]


def damage(run: Path, case: str) -> Path:
    if case == "truncated result.json":
        path = run / "result.json"
        path.write_text(path.read_text()[:40])
    elif case == "result.json of another run":
        path = run / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "run_id": "0" * 12}))
    elif case == "garbled metrics line":
        path = run / "metrics.jsonl"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(["{garbled"] + lines[1:]) + "\n")
    elif case == "metrics missing epochs":
        path = run / "metrics.jsonl"
        path.write_text(path.read_text().splitlines()[0] + "\n")
    else:
        raise ValueError(case)
    return path


CASES = ["truncated result.json", "result.json of another run", "garbled metrics line",
         "metrics missing epochs"]


@pytest.mark.parametrize("case", CASES)
def test_collect_and_status_skip_a_damaged_run_with_one_warning(results, tmp_path, capsys, case):
    bad = damage(one_run(results), case)
    before = snapshot(results)
    out = tmp_path / "runs.csv"
    assert main(["collect", "--results", str(results), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    warnings = [l for l in err.splitlines() if "warning: skipped" in l]
    assert len(warnings) == 1 and str(bad) in warnings[0]
    import pandas as pd
    table = pd.read_csv(out)
    assert len(table) == 3 and one_run(results).name not in set(table["run_id"])
    assert main(["status", str(SPEC), "--results", str(results)]) == 1
    assert "damaged" in capsys.readouterr().out
    assert snapshot(results) == before  # readers change nothing


def test_a_torn_last_metrics_line_is_a_crash_not_damage(results, capsys):
    run = one_run(results)
    (run / "result.json").unlink()  # an unfinished run
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "train_lo')
    assert main(["collect", "--results", str(results)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_damaged_checkpoint_is_moved_aside_and_the_run_restarts(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.epochs=2"])
    whole = train_run(cfg, tmp_path / "whole", "cpu", log=lambda s: None)
    out = tmp_path / "run"
    assert train_run(cfg, out, "cpu", stop_after_epochs=1, log=lambda s: None) is None
    blob = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(blob[: len(blob) // 3])
    said = []
    result = train_run(cfg, out, "cpu", log=said.append)
    aside = list(out.glob("checkpoint.damaged-*.pt"))
    assert len(aside) == 1 and aside[0].read_bytes() == blob[: len(blob) // 3]  # kept, not deleted
    assert any("unreadable" in line and "restarting from epoch 0" in line for line in said)
    assert result["test_acc"] == whole["test_acc"] and result["epochs_completed"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # no epoch twice


@pytest.mark.parametrize("argv", [
    ["run", str(SPEC), "--results", "{file}"], ["plan", str(SPEC), "--results", "{file}"],
    ["status", str(SPEC), "--results", "{file}"], ["collect", "--results", "{file}"],
    ["sweep", str(ROOT / "sweeps" / "digits_tiny.yaml"), "--results", "{file}"],
], ids=["run", "plan", "status", "collect", "sweep"])
def test_a_results_path_that_is_a_file(tmp_path, capsys, argv):
    file = tmp_path / "results"
    file.write_text("not a folder")
    assert main([a.replace("{file}", str(file)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{file} is a file" in err
    assert file.read_text() == "not a folder"


@pytest.mark.parametrize("argv,flag", [
    (["run", str(SPEC), "--workers", "0"], "--workers"),
    (["run", str(SPEC), "--workers", "-1"], "--workers"),
    (["sweep", str(ROOT / "sweeps" / "digits_tiny.yaml"), "--workers", "0"], "--workers"),
    (["stability", "--stages", "0"], "--stages"),
    (["collect", "-o", "table.xlsx"], "-o"),
])
def test_flags_out_of_range_exit_2_naming_the_flag(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_sweep_best_before_any_trial_is_one_line(tmp_path, capsys):
    assert main(["sweep", str(ROOT / "sweeps" / "digits_tiny.yaml"), "--best", "--results", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no study" in err
