"""``abexp replay``: the replays of a spec's finished async runs, as a spec of their own.

The reference is the async run itself: a replay from its trace.txt must end with its weights
and test accuracy bitwise (one thread per process). Then: a replay is run once (a second
``abexp replay`` trains nothing), nothing to replay is one line and exit 2, and the study
figure's replay check counts what the test compares by hand."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from abexp.cli import main
from abexp.lab.runner import runs_dir
from abexp.lab.spec import load_spec

from test_async import assert_same_run


def write_spec(path: Path) -> Path:
    path.write_text(textwrap.dedent("""
        name: replaytest
        base:
          model: {name: resnet8}
          data: {name: digits, subset: 128, test_subset: 64}
          train: {epochs: 2, batch_size: 32}
          optim: {name: sgdm, lr: 0.05}
          eval: {bn: recalibrate}
          tracking: {wandb: {mode: disabled}}
        grid: {seed: [0]}
        variants:
          slow:
            delay.kind: async
            zip: {delay.workers: [2], delay.slowdown: [[1, 3]]}
          constant: {grid: {delay.steps: [1]}}
    """))
    return path


@pytest.fixture
def one_thread_env(monkeypatch):
    monkeypatch.setenv("ABEXP_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def events(run_dir: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_replays_of_finished_async_runs_equal_them_bitwise_and_run_once(tmp_path, capsys, one_thread_env):
    spec, results = write_spec(tmp_path / "s.yaml"), tmp_path / "r"
    # nothing finished yet: one line naming the spec, exit 2, nothing written
    assert main(["replay", str(spec), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(spec) in err[0] and "no finished async run" in err[0]
    assert not (results / "replays").exists()

    assert main(["run", str(spec), "--results", str(results), "--workers", "1", "--no-progress"]) == 0
    assert main(["replay", str(spec), "--results", str(results), "--no-progress"]) == 0
    replay_spec = results / "replays" / "replaytest.yaml"
    doc = yaml.safe_load(replay_spec.read_text())
    async_run = next(r for r in load_spec(spec).expand() if r.config.delay.kind == "async")
    [replay] = load_spec(replay_spec).expand()
    assert doc["name"] == "replaytest" and replay.overrides["variant"] == "slow_replay"
    assert replay.config.delay.kind == "trace" and replay.config.seed == 0
    assert replay.config.delay.trace == str(runs_dir(results) / async_run.run_id / "trace.txt")
    assert_same_run(runs_dir(results) / async_run.run_id, runs_dir(results) / replay.run_id)

    # again: the replay is done, so nothing trains twice
    assert main(["replay", str(spec), "--results", str(results), "--no-progress"]) == 0
    assert events(runs_dir(results) / replay.run_id).count("start") == 1

    # the study figure's check agrees: the one replay ended with its run's weights and accuracy
    assert main(["figures", "--results", str(results), "--experiment", "replaytest"]) == 0
    check = (results / "figures" / "replaytest" / "async_replay_check.md").read_text()
    assert check.startswith("1 of 1 replays")
    table = (results / "figures" / "replaytest" / "async_vs_model_table.md").read_text()
    assert "simulator replaying the slow-worker trace" in table and "constant D = N - 1" in table
