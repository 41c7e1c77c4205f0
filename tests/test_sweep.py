"""Optuna sweeps: exact trial counts under concurrency and SIGKILL, pruning, bad spaces, PostgreSQL."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from abexp.cli import main
from abexp.lab.sweep import load_sweep, open_study, storage_url

ENV = dict(os.environ, WANDB_MODE="disabled", ABEXP_POLL_S="0.3", ABEXP_HEARTBEAT_S="1")
ROOT = Path(__file__).resolve().parent.parent


def write_sweep(path: Path, epochs=2, n_trials=6, pruner="none", sampler="random", space=None,
                subset=128, metric="test_acc") -> Path:
    space = space or ("  optim.lr: {type: float, low: 0.005, high: 0.2, log: true}\n"
                      "  optim.rho: {type: float, low: 0.0, high: 2.0}\n")
    path.write_text(textwrap.dedent(f"""\
        name: {path.stem}
        base:
          model: {{name: resnet8}}
          data: {{name: digits, subset: {subset}, test_subset: 64}}
          train: {{epochs: {epochs}, batch_size: 32}}
          schedule: {{name: constant}}
        fixed: {{optim.name: ab, delay.steps: 2}}
        objective: {{metric: {metric}, reduce: best}}
        sampler: {{name: {sampler}, seed: 0}}
        pruner: {{name: {pruner}}}
        n_trials: {n_trials}
        space:
        """) + space)
    return path


def sweep_cmd(sweep, results, *extra):
    return [sys.executable, "-m", "abexp.cli", "sweep", str(sweep), "--results", str(results),
            "--no-progress", *extra]


def trial_counts(sweep, results, storage=None):
    from optuna.trial import TrialState
    study = open_study(load_sweep(sweep), storage_url(load_sweep(sweep), results, storage))
    trials = study.get_trials(deepcopy=False)
    count = lambda s: sum(t.state == s for t in trials)
    return count(TrialState.COMPLETE), count(TrialState.PRUNED), trials


def events(run_dir):
    p = Path(run_dir) / "events.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_two_workers_finish_exactly_the_target(tmp_path, storage):
    sweep = write_sweep(tmp_path / f"two_{storage}.yaml", n_trials=5)
    url = None if storage == "journal" else f"sqlite:///{tmp_path / 'optuna.db'}"
    extra = ["--workers", "2"] + (["--storage", url] if url else [])
    proc = subprocess.run(sweep_cmd(sweep, tmp_path / "r", *extra), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    complete, pruned, trials = trial_counts(sweep, tmp_path / "r", url)
    assert complete + pruned == 5
    assert len({t.user_attrs["pid"] for t in trials if "pid" in t.user_attrs}) == 2
    for t in trials:  # every finished trial is an ordinary run in the results store
        if t.state.name == "COMPLETE":
            assert (Path(t.user_attrs["run_dir"]) / "result.json").exists()
    # re-running a finished sweep adds nothing
    again = subprocess.run(sweep_cmd(sweep, tmp_path / "r", *extra), env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and sum(trial_counts(sweep, tmp_path / "r", url)[:2]) == 5


def test_sigkill_then_rerun_reaches_the_target_and_resumes(tmp_path):
    sweep = write_sweep(tmp_path / "kill.yaml", epochs=5, n_trials=2)
    results = tmp_path / "r"
    proc = subprocess.Popen(sweep_cmd(sweep, results), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not glob.glob(str(results / "runs" / "*" / "checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_run = Path(glob.glob(str(results / "runs" / "*" / "checkpoint.pt"))[0]).parent
    time.sleep(0.5)
    rerun = subprocess.run(sweep_cmd(sweep, results), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    complete, pruned, trials = trial_counts(sweep, results)
    assert complete + pruned == 2
    assert any("retry_of" in t.user_attrs for t in trials)  # the RUNNING trial was failed and retried
    assert any(e["event"] == "start" and e["from_epoch"] > 0 for e in events(killed_run))


def test_pruning_marks_trials_and_runs(tmp_path):
    """Certain, not likely: two good configurations are enqueued first (they finish the median
    pruner's startup), then two that cannot learn (lr 1e-7): their training loss stays at its
    initial value while the good ones' falls, so the median pruner must stop them."""
    space = ("  optim.lr: {type: categorical, choices: [0.1, 0.05, 1.0e-7]}\n"
             "  optim.rho: {type: categorical, choices: [0.5, 1.0]}\n")
    sweep = write_sweep(tmp_path / "prune.yaml", epochs=4, n_trials=4, pruner="median", space=space,
                        metric="train_loss")
    results = tmp_path / "r"
    study = open_study(load_sweep(sweep), storage_url(load_sweep(sweep), results), create=True)
    for lr, rho in ((0.1, 1.0), (0.05, 1.0), (1.0e-7, 1.0), (1.0e-7, 0.5)):
        study.enqueue_trial({"optim.lr": lr, "optim.rho": rho})
    assert main(["sweep", str(sweep), "--results", str(results), "--no-progress"]) == 0
    complete, pruned, trials = trial_counts(sweep, results)
    by_lr = {}
    for t in trials:
        by_lr.setdefault(t.params["optim.lr"], []).append(t.state.name)
    assert complete == 2 and pruned == 2, by_lr
    assert by_lr[0.1] == by_lr[0.05] == ["COMPLETE"] and by_lr[1.0e-7] == ["PRUNED", "PRUNED"]
    for t in trials:
        if t.state.name == "PRUNED":
            result = json.loads((Path(t.user_attrs["run_dir"]) / "result.json").read_text())
            assert result["status"] == "pruned" and result["epochs_completed"] < 4


PROPOSER = """
import os, random, sys, time
from pathlib import Path
import optuna
from abexp.lab.claims import create_lock
from optuna.trial import TrialState
from abexp.lab.sweep import distinct_finished, load_sweep, open_study, propose, space_size, storage_url

# widen every race: a random pause before and after each parameter Optuna writes
real = optuna.trial.Trial.suggest_categorical
def slow(self, *a, **k):
    time.sleep(random.uniform(0, 0.02)); value = real(self, *a, **k); time.sleep(random.uniform(0, 0.02))
    return value
optuna.trial.Trial.suggest_categorical = slow
sweep = load_sweep(sys.argv[1])
study = open_study(sweep, sys.argv[2], seed=None)
alive = create_lock(Path(sys.argv[3]) / f"{os.getpid()}.lock")  # a live worker's lock, as a sweep worker keeps
for _ in range(40):
    if distinct_finished(study) >= space_size(sweep.space):
        break
    trial = study.ask()
    trial.set_user_attr("worker", {"host": "test", "pid": os.getpid(), "lock": str(alive.lock)})
    params, earlier = propose(study, trial, sweep.space, None)
    if earlier is None:
        study.tell(trial, 0.0)
    else:
        trial.set_user_attr("duplicate_of", earlier)
        study.tell(trial, state=TrialState.FAIL)
"""


def many_concurrent_proposals(tmp_path, sweep, url, processes=6):
    """``processes`` proposers at once on a 6-configuration space, each accepting whatever
    ``propose`` says is new: no configuration may be accepted twice."""
    script = tmp_path / "proposer.py"
    script.write_text(PROPOSER)
    env = dict(ENV, ABEXP_STALE_AFTER_S="600")  # no heartbeat thread here: the locks must not age out
    locks = tmp_path / "workers" / "x"
    locks.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, str(script), str(sweep), url, str(locks)], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    study = open_study(load_sweep(sweep), url)
    accepted = [tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)
                if t.state.name == "COMPLETE"]
    assert len(accepted) == len(set(accepted)) == 6, accepted


def test_concurrent_proposals_never_accept_a_configuration_twice(tmp_path):
    sweep = write_sweep(tmp_path / "race.yaml", sampler="random", space=SMALL_SPACE)
    url = str(tmp_path / "race.journal")
    open_study(load_sweep(sweep), url, create=True)
    many_concurrent_proposals(tmp_path, sweep, url)


def test_trial_equal_to_a_finished_run_reuses_it(tmp_path):
    space = "  optim.lr: {type: categorical, choices: [0.01, 0.05]}\n"
    sweep = write_sweep(tmp_path / "reuse.yaml", epochs=1, n_trials=2, sampler="grid", space=space)
    results = tmp_path / "r"
    assert main(["sweep", str(sweep), "--results", str(results), "--no-progress"]) == 0
    other = f"{tmp_path / 'other.journal'}"
    assert main(["sweep", str(sweep), "--results", str(results), "--storage", other, "--no-progress"]) == 0
    _, _, trials = trial_counts(sweep, results, other)
    for t in trials:
        starts = [e for e in events(t.user_attrs["run_dir"]) if e["event"] == "start"]
        assert len(starts) == 1  # trained once, by the first sweep


@pytest.mark.parametrize("space,key", [
    ("  optim.lrr: {type: float, low: 0.1, high: 0.2}\n", "optim.lrr"),
    ("  optim.lr: {type: float, low: 0.2, high: 0.1}\n", "space.optim.lr.high"),
    ("  optim.lr: {type: float, low: 0.0, high: 0.1, log: true}\n", "space.optim.lr.low"),
    ("  optim.lr: {type: gaussian, low: 0.0, high: 0.1}\n", "space.optim.lr.type"),
    ("  optim.momentum: {type: float, low: 0.5, high: 1.5}\n", "optim.momentum"),
    ("  optim.name: {type: categorical, choices: []}\n", "space.optim.name.choices"),
    # Optuna's own rules, which used to crash the first worker and leave a trial RUNNING:
    ("  optim.lr: {type: float, low: 0.001, high: 0.1, log: true, step: 0.01}\n", "space.optim.lr.step"),
    ("  optim.lr: {type: float, low: 0.01, high: 0.1, step: 0}\n", "space.optim.lr.step"),
    ("  optim.lr: {type: float, low: 0.01, high: 0.1, step: 0.5}\n", "space.optim.lr.step"),
    ("  train.epochs: {type: int, low: 1, high: 8, log: true, step: 2}\n", "space.train.epochs.step"),
    ("  train.epochs: {type: int, low: 1.5, high: 3}\n", "space.train.epochs.low"),
    ("  optim.lr: {type: float, low: 0.01, high: 0.1, log: 'yes'}\n", "space.optim.lr.log"),
    ("  optim.momentum: {type: categorical, choices: [[0.9], 0.8]}\n", "space.optim.momentum.choices"),
    ("  optim.momentum: {type: categorical, choices: [0.9, 0.9]}\n", "space.optim.momentum.choices"),
])
def test_invalid_search_space_exits_2_naming_the_key(tmp_path, capsys, space, key):
    sweep = write_sweep(tmp_path / "bad.yaml", space=space)
    assert main(["sweep", str(sweep), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert key in err and str(sweep) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_trial_left_without_parameters_is_named_then_failed_and_the_sweep_finishes(tmp_path):
    """A worker that died right after asking (no parameters, no worker lock, no pid) leaves a
    RUNNING trial: the next sweep says it waits for it, fails it once it is older than the
    stale limit, and finishes (it used to wait silently for ever)."""
    sweep = write_sweep(tmp_path / "s.yaml", epochs=1, n_trials=1)
    results = tmp_path / "r"
    study = open_study(load_sweep(sweep), storage_url(load_sweep(sweep), results), create=True)
    orphan = study.ask()
    out = subprocess.run(sweep_cmd(sweep, results), env=dict(ENV, ABEXP_STALE_AFTER_S="20"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"waiting for trial {orphan.number} (no worker recorded" in out.stderr
    complete, _, trials = trial_counts(sweep, results)
    assert complete == 1
    assert [t.state.name for t in trials if t.number == orphan.number] == ["FAIL"]


def test_best_exports_a_spec_over_seeds(tmp_path, capsys):
    from abexp.lab.spec import load_spec
    space = "  optim.lr: {type: categorical, choices: [0.01, 0.05]}\n"
    sweep = write_sweep(tmp_path / "b.yaml", epochs=1, n_trials=2, sampler="grid", space=space)
    results = tmp_path / "r"
    assert main(["sweep", str(sweep), "--results", str(results), "--no-progress"]) == 0
    export = tmp_path / "b_best.yaml"
    assert main(["sweep", str(sweep), "--results", str(results), "--best", "--export", str(export)]) == 0
    out = capsys.readouterr().out
    _, _, trials = trial_counts(sweep, results)
    best = max((t for t in trials if t.value is not None), key=lambda t: t.value)
    assert f"{best.value:.6g}" in out
    plan = load_spec(export).expand()
    assert [r.config.seed for r in plan] == [0, 1, 2]
    assert plan[0].config.optim.lr == best.params["optim.lr"]
    assert plan[0].run_id == best.user_attrs["run_id"]  # seed 0 is the trial's own run


SMALL_SPACE = ("  optim.lr: {type: categorical, choices: [0.01, 0.02, 0.05]}\n"
               "  optim.rho: {type: categorical, choices: [0.5, 1.0]}\n")


def finished_params(trials):
    return [tuple(sorted(t.params.items())) for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


def two_concurrent_sweeps(sweep, results, *extra):
    """Two separate `abexp sweep` commands at once: each one's worker 0 with the same file's seed."""
    procs = [subprocess.Popen(sweep_cmd(sweep, results, *extra), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_concurrent_sweeps_and_reruns_never_repeat_a_configuration(tmp_path, sampler):
    sweep = write_sweep(tmp_path / f"dup_{sampler}.yaml", epochs=1, n_trials=4, sampler=sampler,
                        space=SMALL_SPACE)
    results = tmp_path / "r"
    codes, outs = two_concurrent_sweeps(sweep, results)
    assert codes == [0, 0], outs
    # a re-run with a larger target (same file seed) must still propose only new configurations
    rerun = subprocess.run(sweep_cmd(sweep, results, "--n-trials", "6"), env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    _, _, trials = trial_counts(sweep, results)
    done = finished_params(trials)
    assert len(done) == 6 and len(set(done)) == 6, done  # all 6 configurations, each once
    seeds = {t.user_attrs["sampler_seed"] for t in trials if "sampler_seed" in t.user_attrs}
    assert len(seeds) >= 2  # one per process, recorded on its trials
    for t in trials:  # a repeat is told FAIL and names the trial it repeats
        if "duplicate_of" in t.user_attrs:
            assert t.state.name == "FAIL"
            assert t.params == next(o.params for o in trials if o.number == t.user_attrs["duplicate_of"])
    # asking for more than the space holds stops with every configuration done once, exit 0
    more = subprocess.run(sweep_cmd(sweep, results, "--n-trials", "8"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert more.returncode == 0 and "every configuration of the space is done" in more.stdout, more.stderr
    assert len(finished_params(trial_counts(sweep, results)[2])) == 6


def test_a_missing_storage_driver_is_one_line(tmp_path):
    sweep = write_sweep(tmp_path / "d.yaml", epochs=1, n_trials=1)
    proc = subprocess.run(sweep_cmd(sweep, tmp_path / "r", "--storage", "mysql+nosuchdriver://u@h/db"),
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--storage" in proc.stderr and "nosuchdriver" in proc.stderr


def test_shipped_sweeps_validate():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.n_trials >= 1 and sweep.space


def _initdb() -> str | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return found


@pytest.fixture
def postgres_url():
    initdb = _initdb()
    if initdb is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                    "install Debian's postgresql package to run this test")
    bindir = Path(initdb).resolve().parent
    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) not installed")
    home = Path(tempfile.mkdtemp(prefix="abexp-pg-"))
    prefix = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(home, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = home / "data"
    run = lambda *cmd: subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True)
    run(str(bindir / "initdb"), "-D", str(data), "-U", "abexp", "--auth=trust")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-o",
        f"-p {port} -k {home} -h 127.0.0.1", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "abexp", "abexp")
        yield f"postgresql+psycopg://abexp@127.0.0.1:{port}/abexp"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_postgresql_storage_with_two_workers(tmp_path, postgres_url):
    sweep = write_sweep(tmp_path / "pg.yaml", epochs=1, n_trials=4)
    proc = subprocess.run(sweep_cmd(sweep, tmp_path / "r", "--workers", "2", "--storage", postgres_url),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    complete, pruned, _ = trial_counts(sweep, tmp_path / "r", postgres_url)
    assert complete + pruned == 4
    # two separate processes on one PostgreSQL study: no configuration twice
    small = write_sweep(tmp_path / "pg_small.yaml", epochs=1, n_trials=5, sampler="tpe", space=SMALL_SPACE)
    plain_url = postgres_url.replace("postgresql+psycopg://", "postgresql://")  # as a user writes it
    codes, outs = two_concurrent_sweeps(small, tmp_path / "r", "--storage", plain_url)
    assert codes == [0, 0], outs
    done = finished_params(trial_counts(small, tmp_path / "r", plain_url)[2])
    assert len(done) == 5 and len(set(done)) == 5, done
    # many proposers at once, with pauses between Optuna's per-parameter writes
    race = write_sweep(tmp_path / "pg_race.yaml", sampler="random", space=SMALL_SPACE)
    open_study(load_sweep(race), postgres_url, create=True)
    many_concurrent_proposals(tmp_path, race, postgres_url)


def test_a_spec_as_base_says_its_grid_and_variants_are_not_used(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nbase: {model: {name: resnet8}, data: {name: digits}, train: {epochs: 1}}\n"
                    "variants: {ab: {optim.name: ab}}\ngrid: {delay.steps: [0, 8]}\n")
    sweep = tmp_path / "sw.yaml"
    sweep.write_text("name: sw\nbase: spec.yaml\nspace:\n  optim.lr: {type: float, low: 0.01, high: 0.1}\n")
    s = load_sweep(sweep)
    assert s.base["optim"]["name"] == "sgdm" and s.base["delay"]["steps"] == 0  # the spec's base only
    [note] = s.notes
    assert note.startswith(f"{sweep}: base spec.yaml is a spec") and "its grid and variants are not" in note


def test_space_checks_accept_what_optuna_accepts_and_name_the_closest_key(tmp_path, capsys):
    ok = write_sweep(tmp_path / "ok.yaml", space="  optim.lr: {type: float, low: 0.1, high: 0.3, step: 0.2}\n")
    assert load_sweep(ok).space["optim.lr"]["step"] == 0.2  # 0.3 - 0.1 rounds below 0.2: still fine
    bad = write_sweep(tmp_path / "bad.yaml", space="  optim.lr: {type: float, low: 0.1, high: 0.3, lgo: true}\n")
    assert main(["sweep", str(bad), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "space.optim.lr.lgo: unknown key (did you mean" in err and "log" in err.split("did you mean")[1]
    grid = write_sweep(tmp_path / "grid.yaml", sampler="grid",
                       space="  train.epochs: {type: int, low: 1, high: 8, step: 1, log: true}\n")
    assert main(["sweep", str(grid), "--results", str(tmp_path / "r")]) == 2
    assert "sampler.name" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_trials_table_while_no_trial_has_a_value(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "s.yaml")
    results = tmp_path / "r"
    study = open_study(load_sweep(sweep), storage_url(load_sweep(sweep), results), create=True)
    study.ask()  # running, no value
    failed = study.ask()
    study.tell(failed, state=__import__("optuna").trial.TrialState.FAIL)
    assert main(["sweep", str(sweep), "--results", str(results), "--trials"]) == 0
    out = capsys.readouterr().out
    assert "s: 2 trials (1 RUNNING, 1 FAIL)" in out or "s: 2 trials (1 FAIL, 1 RUNNING)" in out


# ---------------------------------------------------------------- bad inputs up front, failing trials

INJECT = """
import os
lrs = os.environ.get("ABEXP_TEST_FAIL_LRS")
if lrs:  # a failure only a worker meets: its training raises for these learning rates
    import abexp.train.start as start
    real = start.train_run
    def train_run(cfg, *args, **kwargs):
        if repr(cfg.optim.lr) in lrs.split(","):
            raise OSError(f"injected: the data of lr {cfg.optim.lr} went away")
        return real(cfg, *args, **kwargs)
    start.train_run = train_run
"""


def failing_env(tmp_path, lrs: str) -> dict:
    """ENV whose worker processes fail the training of these learning rates (sitecustomize)."""
    (tmp_path / "inject").mkdir(exist_ok=True)
    (tmp_path / "inject" / "sitecustomize.py").write_text(INJECT)
    path = os.pathsep.join([str(tmp_path / "inject"), str(ROOT), ENV.get("PYTHONPATH", "")])
    return dict(ENV, PYTHONPATH=path, ABEXP_TEST_FAIL_LRS=lrs)


def test_a_sweep_whose_trials_all_fail_stops_after_three_and_says_it_once(tmp_path):
    space = "  optim.lr: {type: categorical, choices: [0.01, 0.02, 0.03, 0.04, 0.05]}\n"
    sweep = write_sweep(tmp_path / "fails.yaml", epochs=1, n_trials=5, space=space)
    results = tmp_path / "r"
    proc = subprocess.run(sweep_cmd(sweep, results), env=failing_env(tmp_path, "0.01,0.02,0.03,0.04,0.05"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    complete, pruned, trials = trial_counts(sweep, results)
    assert complete == pruned == 0 and [t.state.name for t in trials] == ["FAIL"] * 3  # the default, 3
    said = [line for line in proc.stderr.splitlines() if "injected" in line]
    assert len(said) == 1, proc.stderr
    assert "stopped after 3 failed trials in a row (max_consecutive_failures: 3)" in said[0]
    last = trials[-1]
    assert f"run {last.user_attrs['run_id']} failed: OSError: injected: the data of lr " \
           f"{last.params['optim.lr']} went away" in said[0]
    # the failed trials' run folders only (a failed configuration may be proposed again)
    assert {p.name for p in (results / "runs").iterdir()} == {t.user_attrs["run_id"] for t in trials}


def test_a_diverged_trial_is_a_result_and_breaks_a_run_of_failures(tmp_path):
    """Trials in a fixed order: fail, diverge, fail, fail, with max_consecutive_failures 2. A
    diverged trial counting as a failure would stop the sweep after the second trial; a
    successful one resets the count, so the sweep stops after the fourth."""
    space = "  optim.lr: {type: categorical, choices: [0.01, 1.0e+36, 0.03, 0.04, 0.05]}\n"
    sweep = write_sweep(tmp_path / "div.yaml", epochs=1, n_trials=5, space=space)
    sweep.write_text(sweep.read_text().replace("n_trials: 5\n", "n_trials: 5\nmax_consecutive_failures: 2\n"))
    results = tmp_path / "r"
    study = open_study(load_sweep(sweep), storage_url(load_sweep(sweep), results), create=True)
    for lr in (0.01, 1.0e+36, 0.03, 0.04, 0.05):
        study.enqueue_trial({"optim.lr": lr})
    proc = subprocess.run(sweep_cmd(sweep, results), env=failing_env(tmp_path, "0.01,0.03,0.04,0.05"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    _, _, trials = trial_counts(sweep, results)
    trials = [t for t in trials if t.state.name != "WAITING"]  # the fifth, never asked for
    assert [(t.params["optim.lr"], t.state.name) for t in trials] == \
        [(0.01, "FAIL"), (1.0e+36, "COMPLETE"), (0.03, "FAIL"), (0.04, "FAIL")]
    diverged = trials[1]
    assert diverged.user_attrs["status"] == "diverged" and diverged.value == 0.0  # diverged_value
    assert "stopped after 2 failed trials in a row" in proc.stderr and "lr 0.04 went away" in proc.stderr


SWEEP_40 = """\
name: s40
base:
  model: {name: resnet8}
  data: {name: digits, subset: 64, test_subset: 32}
  train: {epochs: 1, batch_size: 32}
  delay: {kind: pipeline, stages: 40}
space:
  optim.lr: {type: float, low: 0.01, high: 0.1}
n_trials: 1
"""


@pytest.mark.parametrize("label,edit,key,fragment", [
    ("the base's 40 stages", lambda t: t, "s.yaml: delay.stages:", "resnet8 has 23 parameter tensors"),
    ("an int range reaching 24", lambda t: t.replace("stages: 40", "stages: 4").replace(
        "optim.lr: {type: float, low: 0.01, high: 0.1}", "delay.stages: {type: int, low: 2, high: 26, step: 11}"),
     "s.yaml: space.delay.stages: with delay.stages = 24:", "at most 23 stages"),
    ("a model choice too small for the stages", lambda t: t.replace("stages: 40", "stages: 30").replace(
        "model: {name: resnet8}", "model: {name: resnet20}").replace(
        "optim.lr: {type: float, low: 0.01, high: 0.1}", "model.name: {type: categorical, choices: [resnet20, resnet8]}"),
     "s.yaml: delay.stages: with model.name = resnet8:", "resnet8 has 23 parameter tensors"),
    ("a data root choice that is missing", lambda t: t.replace("data: {name: digits, subset: 64, test_subset: 32}",
                                                               "data: {name: fashion_mnist, root: nowhere}").replace(
        "delay: {kind: pipeline, stages: 40}", "delay: {steps: 2}").replace(
        "optim.lr: {type: float, low: 0.01, high: 0.1}", "data.root: {type: categorical, choices: [nowhere]}"),
     "s.yaml: space.data.root: with data.root = nowhere:", "nowhere"),
])
def test_a_sweep_refuses_what_no_trial_could_run_before_its_study_exists(tmp_path, monkeypatch, capsys, label,
                                                                       edit, key, fragment):
    """Tried as a new user: a base asking for 40 stages of ResNet-8 used to write thousands of
    failed run folders in minutes. Every end of the space is checked up front: exit 2, one line,
    no journal, workers folder or run folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(edit(SWEEP_40))
    assert main(["sweep", "s.yaml", "--results", "r", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and fragment in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_space_inside_the_model_passes_the_stage_check(tmp_path):
    """The other side of the refusals above: the ends 2 and 23 are both cuttable."""
    from abexp.lab.preflight import check_sweep
    text = SWEEP_40.replace("stages: 40", "stages: 4").replace(
        "optim.lr: {type: float, low: 0.01, high: 0.1}", "delay.stages: {type: int, low: 2, high: 23}")
    (tmp_path / "s.yaml").write_text(text)
    sweep = load_sweep(tmp_path / "s.yaml")
    check_sweep(str(sweep.path), sweep.base, sweep.space)  # raises on a bad end


@pytest.mark.parametrize("name", ["../../evil_escape", "a/b", "..", ".hidden", "x..y", "back\\\\slash"])
def test_a_sweep_name_that_is_a_path_is_refused(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(f'name: "{name}"\nbase: {{}}\nspace:\n  optim.lr: {{type: float, low: 0.01, high: 0.1}}\n')
    assert main(["sweep", "s.yaml", "--results", "r/deep", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("abexp: error: s.yaml: name: ") and "plain name" in err[0], err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["s.yaml"]


def test_a_set_value_holding_a_path_stays_one_file_name(tmp_path):
    """--set appends KEY=VALUE to the study name; a value such as ../../x must not turn the
    journal or the workers folder into a path."""
    sweep = write_sweep(tmp_path / "p.yaml")
    s = load_sweep(sweep, ["data.root=../../../x"])
    assert s.name == "p__data.root=../../../x"  # the study's name is unchanged
    journal = Path(storage_url(s, tmp_path / "r"))
    assert journal.parent == tmp_path / "r" / "sweeps" and journal.name == "p__data.root=..%2F..%2F..%2Fx.journal"
    from abexp.lab.sweep import worker_lock_dir
    assert worker_lock_dir(tmp_path / "r", s).parent == tmp_path / "r" / "sweeps"
