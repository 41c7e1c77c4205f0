"""The seams a contributor extends: RunFolder (a run folder's names and states), launch backends
chosen by name for ``abexp run`` (check before anything, then launch), the sweep file's schema."""

import json
import textwrap
from pathlib import Path

import pytest

from abexp.cli import main
from abexp.lab import backends
from abexp.lab.spec import load_spec
from abexp.train.folder import STATES, RunFolder


def test_run_folder_names_the_files_a_stored_run_folder_holds(tmp_path):
    """The on-disk names are the format stored results folders were written in: spelled here by
    hand, independently of RunFolder."""
    f = RunFolder.of(tmp_path, "abc123")
    assert f.path == tmp_path / "runs" / "abc123" and f.run_id == "abc123"
    expected = {"config": "config.yaml", "metrics": "metrics.jsonl", "checkpoint": "checkpoint.pt",
                "result": "result.json", "weights": "model.pt", "events": "events.jsonl", "log": "log.txt",
                "failed": "failed.json", "lock": "claim.lock", "takeover": "claim.takeover", "trace": "trace.txt"}
    assert {k: getattr(f, k).name for k in expected} == expected
    assert all(getattr(f, k).parent == f.path for k in expected)


@pytest.mark.parametrize("files,live,state", [
    ({}, True, "pending"),
    ({"checkpoint.pt": ""}, True, "partial"),
    ({"checkpoint.pt": "", "failed.json": "{}"}, True, "failed"),
    ({"checkpoint.pt": "", "claim.lock": "{}"}, True, "running"),
    ({"checkpoint.pt": "", "claim.lock": "{}"}, False, "partial"),  # a dead holder's lock
    ({"result.json": json.dumps({"status": "diverged"}), "claim.lock": "{}"}, True, "diverged"),
    ({"result.json": json.dumps({"status": "pruned"})}, True, "pruned"),
    ({"result.json": "{trunc"}, True, "damaged"),
    ({"result.json": json.dumps({"status": "exploded"})}, True, "damaged"),
])
def test_run_folder_state_from_the_files_alone(tmp_path, files, live, state):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert RunFolder(tmp_path).state(claim_live=lambda lock: live) == state
    assert state in STATES


def test_failed_in_session_reads_failed_json(tmp_path):
    f = RunFolder(tmp_path)
    assert not f.failed_in("s1")  # no failed.json
    (tmp_path / "failed.json").write_text(json.dumps({"session": "s1"}))
    assert f.failed_in("s1") and not f.failed_in("s2")
    (tmp_path / "failed.json").write_text("[1, 2")  # damaged: not failed in any session
    assert not f.failed_in("s1")


SPEC = """
name: tiny
base:
  model: {name: resnet8}
  data: {name: digits, subset: 64, test_subset: 32}
  train: {epochs: 1, batch_size: 32}
grid:
  seed: [0, 1, 2]
"""


class Recorder:
    """A launch backend that records what it was asked, in order."""
    name = "recorder"
    calls: list = []

    def __init__(self, refuse: bool = False):
        self.refuse = refuse

    def check(self, launch: backends.Launch) -> None:
        Recorder.calls.append(("check", [r.run_id for r in launch.plan], launch.overrides, launch.options["array"]))
        if self.refuse:
            from abexp.config import ConfigError
            raise ConfigError("--backend", "", "recorder: refused")

    def launch(self, launch: backends.Launch) -> int:
        Recorder.calls.append(("launch", launch.spec_path, launch.results, launch.pack))
        return 7


@pytest.fixture
def recorder(monkeypatch):
    Recorder.calls = []
    monkeypatch.setitem(backends.BACKENDS, "recorder", Recorder)
    monkeypatch.setitem(backends.BACKENDS, "refuser", lambda: Recorder(refuse=True))
    return Recorder.calls


def test_abexp_run_checks_then_launches_the_backend_named_by_flag(tmp_path, monkeypatch, recorder):
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(textwrap.dedent(SPEC))
    ids = [r.run_id for r in load_spec("s.yaml", ["optim.lr=0.2"]).expand()]
    code = main(["run", "s.yaml", "--results", "r", "--backend", "recorder", "--set", "optim.lr=0.2",
                 "--array", "5", "--pack", "2"])
    assert code == 7  # the backend's exit code is the command's
    assert recorder == [("check", ids, ["optim.lr=0.2"], 5), ("launch", "s.yaml", "r", 2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # the backend wrote nothing


def test_a_backend_refusing_in_check_is_one_line_exit_2_and_never_launched(tmp_path, monkeypatch, capsys, recorder):
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(textwrap.dedent(SPEC))
    assert main(["run", "s.yaml", "--results", "r", "--backend", "refuser"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["abexp: error: --backend: recorder: refused"]
    assert [c[0] for c in recorder] == ["check"]


def test_an_unknown_backend_names_the_registered_ones():
    from abexp.config import ConfigError
    with pytest.raises(ConfigError, match="no such launch backend.*local, slurm"):
        backends.get_backend("kubernetes")
    assert backends.get_backend("local").name == "local" and backends.get_backend("slurm").name == "slurm"


def test_slurm_refuses_pack_in_check_before_asking_sinfo(tmp_path, monkeypatch, capsys):
    from abexp.lab import slurm
    monkeypatch.setattr(slurm, "query_nodes", lambda: pytest.fail("sinfo asked before --pack was refused"))
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(textwrap.dedent(SPEC))
    assert main(["run", "s.yaml", "--results", "r", "--backend", "slurm", "--pack", "2"]) == 2
    assert "--pack: local only" in capsys.readouterr().err


@pytest.mark.parametrize("text,key,words", [
    ("sampler: {name: tpe, seeed: 1}\n", "sampler.seeed", "did you mean sampler.seed"),
    ("objective: {metric: acc}\n", "objective.metric", "'test_acc'"),
    ("n_trials: 0\n", "n_trials", "positive integer"),
    ("storag: x\n", "storag", "did you mean storage"),
])
def test_a_sweep_file_key_is_checked_by_its_schema(tmp_path, capsys, text, key, words):
    sweep = tmp_path / "w.yaml"
    sweep.write_text("name: w\nbase: {}\nspace: {optim.lr: {type: float, low: 0.01, high: 0.1}}\n" + text)
    assert main(["sweep", str(sweep), "--results", str(tmp_path / "r")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"abexp: error: {sweep}: {key}: ") and words in line, line
    assert not (tmp_path / "r").exists()


def _accepts(impl, proto) -> list[str]:
    """Why ``impl`` cannot stand where ``proto`` is called (empty when it can): each of the
    protocol's parameters is there, by name and position, with a default where it has one, and
    the implementation requires nothing more."""
    import inspect

    want = list(inspect.signature(proto).parameters.values())[1:]
    have = list(inspect.signature(impl).parameters.values())[1:]
    bad = []
    for k, p in enumerate(want):
        q = have[k] if k < len(have) else None
        if q is None or q.name != p.name:
            bad.append(f"no parameter {p.name} at position {k}")
        elif p.default is not inspect.Parameter.empty and q.default is inspect.Parameter.empty:
            bad.append(f"{p.name} has no default")
    bad += [f"requires {q.name}" for q in have[len(want):] if q.default is inspect.Parameter.empty
            and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    return bad


def test_the_single_run_async_and_packed_trainers_implement_the_trainer_protocol():
    from abexp.train.async_ps import AsyncRun
    from abexp.train.lifecycle import Trainer, ValidatingTrainer
    from abexp.train.packed import PackedRun
    from abexp.train.run import Run

    methods = [n for n in vars(Trainer) if not n.startswith("_") and callable(vars(Trainer)[n])]
    assert {"train_epoch", "evaluate", "checkpoint", "restore", "result", "barrier"} <= set(methods)
    for cls, proto in ((Run, ValidatingTrainer), (AsyncRun, ValidatingTrainer), (PackedRun, Trainer)):
        for name in methods:
            want = getattr(proto, name)
            assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
            assert not _accepts(getattr(cls, name), want), (cls.__name__, name, _accepts(getattr(cls, name), want))
    # the check itself refuses a mismatch: a pack cannot be asked for its validation set
    assert _accepts(PackedRun.evaluate, ValidatingTrainer.evaluate) == ["no parameter split at position 1"]
