"""Optuna sweeps whose trials are ordinary runs in the same results store: the study, its
workers and ``abexp sweep``. The file is read by abexp.lab.sweep_file; ``--trials`` and
``--best`` are abexp.lab.sweep_report.

``n_trials`` is the total target: COMPLETE + PRUNED trials. Workers count before asking and
re-check after (trial numbers are assigned atomically by the storage), so concurrent workers
never overshoot; a surplus trial is told FAIL with user attr ``surplus``. A trial left RUNNING
by a dead worker (its pid is gone on this host, or its run's claim heartbeat is stale) is failed
and its parameters re-enqueued; the retry has the same config, hence the same run_id, and
resumes the run's checkpoint. This works identically for journal and RDB storage.

A trial whose run raises (not one that diverges: that is a result) is told FAIL with user attr
``error``; after ``max_consecutive_failures`` of them in a row within one ``abexp sweep`` its
workers stop and the sweep exits 1, saying the last error once.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from abexp import io
from abexp.config import ConfigError, RunConfig, run_id, set_dotted, validate
from abexp.lab.claims import STALE_AFTER_S, ClaimLost, Heartbeat, create_lock, is_stale, pid_alive, try_claim
from abexp.lab.local import supervise, thread_share, visible_gpus, worker_env
from abexp.lab.preflight import path_component
from abexp.lab.runner import POLL_S, apply_thread_budget, runs_dir, train_claimed
from abexp.lab.sweep_file import Sweep, finite_values, load_sweep, objective_text  # noqa: F401 -- load_sweep: the sweep's API
from abexp.train.folder import RunFolder

MAX_REPEATS = 50  # proposals in a row that repeat a trial: the sampler has nothing new to offer
SESSION_ENV = "ABEXP_SWEEP_SESSION"  # one `abexp sweep` command's workers count failures together


# ---------------------------------------------------------------- Optuna plumbing

def storage_url(sweep: Sweep, results: str | Path, override: str | None = None) -> str:
    return override or sweep.storage or str(Path(results) / "sweeps" / f"{path_component(sweep.name)}.journal")


def journal_path(url: str) -> Path | None:
    """The journal file a storage URL names (a path or journal://path), or None for a database."""
    return Path(url.removeprefix("journal://")) if "://" not in url or url.startswith("journal://") else None


def make_storage(url: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(rdb_url(url), engine_kwargs=kwargs)


def rdb_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; abexp installs psycopg (3), so a plain
    URL is pointed at it unless psycopg2 is there. Any other driver missing is one clear line."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None:
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    scheme = url.split("://", 1)[0]
    driver = scheme.split("+", 1)[1] if "+" in scheme else None
    if driver and importlib.util.find_spec(driver) is None:
        raise ConfigError("--storage", "", f"{scheme}://: the Python driver {driver!r} is not installed "
                                           f"(pip install {driver})")
    return url


def _grid_space(space: dict) -> dict[str, list]:
    return {key: finite_values(s) for key, s in space.items()}  # load_sweep checked they are finite


def process_seed(sweep: Sweep) -> int:
    """A sampler seed of this process: ``sampler.seed`` mixed with fresh entropy.

    Seeding with ``seed + worker`` made every re-run, every second ``abexp sweep`` and every
    other machine replay the same stream of proposals. Each trial records the seed that
    proposed it (user attr ``sampler_seed``).
    """
    import hashlib

    entropy = f"{sweep.sampler.get('seed')}/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}"
    return int.from_bytes(hashlib.sha256(entropy.encode()).digest()[:4], "little")


def make_sampler(sweep: Sweep, seed: int | None):
    import optuna

    name = sweep.sampler.get("name", "tpe")
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(_grid_space(sweep.space), seed=seed)
    # constant_liar: a running trial counts as a poor result, so concurrent workers spread out
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def space_size(space: dict) -> float:
    """How many distinct configurations the space holds (inf when any parameter is continuous)."""
    size = 1.0
    for s in space.values():
        values = finite_values(s)
        if values is None:
            return float("inf")
        size *= len(values)
    return size


def config_key(params: dict) -> str:
    """A trial's whole configuration as one string, published in one write (user attr
    ``config``): Optuna writes the parameters one at a time, so ``t.params`` of a live trial
    may be incomplete; its ``config`` is all or nothing."""
    import json

    return json.dumps(sorted(params.items()), sort_keys=True)


def published_config(t) -> str | None:
    """The configuration trial ``t`` has claimed: its ``config`` attr, a waiting (enqueued)
    trial's fixed parameters, or a finished trial's parameters; None while it is unknown."""
    from optuna.trial import TrialState

    if "config" in t.user_attrs:
        return t.user_attrs["config"]
    if t.state == TrialState.WAITING and "fixed_params" in t.system_attrs:
        return config_key(t.system_attrs["fixed_params"])
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return config_key(t.params)
    return None


def duplicate_of(study, trial, params: dict, poll_s: float = 0.05) -> int | None:
    """The number of an earlier live or finished trial with these parameters, or None.

    Called after this trial published its own ``config``. Every earlier trial still RUNNING
    without a published configuration is waited for (it is mid-proposal, or dead and then
    failed by ``fail_stale_trials``), so of two trials that drew one configuration the later
    always sees the earlier and gives way, whatever order the storage shows the writes in.
    """
    from optuna.trial import TrialState

    mine = config_key(params)
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number]
        unknown = [t for t in earlier if published_config(t) is None]
        for t in earlier:
            if published_config(t) == mine:
                return t.number
        if not unknown:
            return None
        fail_stale_trials(study)
        time.sleep(poll_s)


def distinct_finished(study) -> int:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return len({tuple(sorted(t.params.items())) for t in done})


def make_pruner(sweep: Sweep):
    import optuna

    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=int(sweep.base["train"]["epochs"]))
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep, url: str, seed: int | None = None, create: bool = False):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = dict(study_name=sweep.name, storage=make_storage(url),
                  sampler=make_sampler(sweep, seed), pruner=make_pruner(sweep))
    if create:
        return optuna.create_study(direction=sweep.direction, load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)


def suggest(trial, space: dict) -> dict[str, Any]:
    params = {}
    for key, s in space.items():
        if s["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, s["choices"])
        elif s["type"] == "int":
            params[key] = trial.suggest_int(key, int(s["low"]), int(s["high"]), step=int(s.get("step", 1)),
                                            log=bool(s.get("log", False)))
        else:
            params[key] = trial.suggest_float(key, float(s["low"]), float(s["high"]), step=s.get("step"),
                                              log=bool(s.get("log", False)))
    return params


def trial_config(sweep: Sweep, params: dict) -> RunConfig:
    tree = yaml.safe_load(yaml.safe_dump(sweep.base))
    for key, value in params.items():
        set_dotted(tree, key, value, str(sweep.path))
    tree["experiment"] = sweep.name
    tree["variant"] = "trial"
    cfg = validate(tree, str(sweep.path))
    cfg.tracking.wandb.group = sweep.name  # W&B: trials grouped under the sweep
    return cfg


def objective_value(sweep: Sweep, rows: list[dict]) -> float | None:
    values = [r[sweep.metric] for r in rows if r.get(sweep.metric) is not None]
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return None
    if sweep.reduce == "final":
        return float(values[-1])
    return float(max(values) if sweep.direction == "maximize" else min(values))


def worker_lock_dir(results: str | Path, sweep: Sweep) -> Path:
    """Where each sweep worker keeps a heartbeat lock (abexp.lab.claims) naming it alive."""
    return Path(results) / "sweeps" / f"{path_component(sweep.name)}.workers"


def trial_is_stale(t, stale_after: float = STALE_AFTER_S) -> bool:
    """Is a RUNNING trial's worker gone? By its worker's heartbeat lock (pid on this host,
    else the lock's age in the shared filesystem's clock). A trial with no ``worker`` attr
    (its process died between ``ask`` and its first write) is judged by its start time, the
    only clock it has (the asking host's)."""
    import datetime

    worker = t.user_attrs.get("worker")
    if worker is not None:
        lock = Path(worker["lock"])
        return not lock.exists() or is_stale(lock, stale_after)
    host, pid, rid = t.user_attrs.get("host"), t.user_attrs.get("pid"), t.user_attrs.get("run_dir")
    if host is not None and pid is not None:  # a trial of a journal written before worker locks
        if host == socket.gethostname():
            return not pid_alive(int(pid))
        lock = RunFolder(rid).lock if rid else None
        return lock is not None and lock.exists() and is_stale(lock, stale_after)
    started = t.datetime_start
    if started is None:
        return False
    return (datetime.datetime.now() - started).total_seconds() > stale_after


def fail_stale_trials(study) -> int:
    """Fail RUNNING trials whose worker is gone, and re-enqueue their parameters once (when
    they had published a whole configuration)."""
    import optuna
    from optuna.trial import TrialState

    retried = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not trial_is_stale(t):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker failed it first
        if "config" in t.user_attrs:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            retried += 1
    return retried


def trial_running(study, trial) -> bool:
    from optuna.trial import TrialState

    return study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING


class TrialFailed(Exception):
    """A trial's run raised: its error in one line, and where the traceback is."""


def run_failure(rid: str, run_dir: Path) -> str:
    """The one line that says why run ``rid`` failed: the last line of the traceback its worker
    recorded in failed.json (``ValueError: ...``), and where the whole traceback is."""
    folder = RunFolder(run_dir)
    try:
        traceback = folder.read_failure().get("traceback") or ""
        last = [line for line in traceback.splitlines() if line.strip()][-1].strip()
    except (OSError, ValueError, IndexError, AttributeError):
        last = f"no {folder.FAILED}"
    return f"run {rid} failed: {last} (traceback in {folder.log})"


def consecutive_failures(study, session: str) -> list:
    """The trials of ``session`` (one ``abexp sweep`` command) whose run raised since its last
    COMPLETE or PRUNED trial, in the order they finished. A diverged trial is COMPLETE (a
    result), and a surplus, duplicate or stale trial is FAIL without ``error``: neither counts."""
    import datetime

    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    mine = [t for t in study.get_trials(deepcopy=False)
            if (t.user_attrs.get("worker") or {}).get("session") == session
            and (t.state in done or (t.state == TrialState.FAIL and "error" in t.user_attrs))]
    mine.sort(key=lambda t: (t.datetime_complete or datetime.datetime.max, t.number))
    streak: list = []
    for t in mine:
        streak = [] if t.state in done else streak + [t]
    return streak


class TrialAbandoned(ClaimLost):
    """This worker's trial was failed by another worker (it judged this one dead) and retried:
    like a lost run claim, the worker stops and writes nothing more for it."""


def _counted(study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials; FAIL ones do not count toward n_trials."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return finished, states.count(TrialState.RUNNING), states.count(TrialState.WAITING)


def run_trial(sweep: Sweep, study, trial, params: dict, results: str | Path, session: str,
              heartbeat: Heartbeat):
    """Train (or reuse) the run of one trial; returns the Optuna outcome."""
    import optuna

    cfg = trial_config(sweep, params)
    rid = run_id(cfg)
    run_dir = runs_dir(results) / rid
    folder = RunFolder(run_dir)
    for key, value in (("run_id", rid), ("run_dir", str(run_dir)), ("host", socket.gethostname()),
                       ("pid", os.getpid())):
        trial.set_user_attr(key, value)

    def on_epoch(row: dict) -> bool:
        if not trial_running(study, trial):
            raise TrialAbandoned(f"trial {trial.number}: failed and retried by another worker")
        if row.get(sweep.metric) is None:
            return False
        trial.report(float(row[sweep.metric]), step=int(row["epoch"]))
        return trial.should_prune()

    while not folder.finished():
        claim = try_claim(run_dir)
        if claim is None:  # the same config is being trained elsewhere: wait, then reuse it
            time.sleep(POLL_S)
            continue
        heartbeat.add(claim)
        try:
            status = train_claimed(cfg, run_dir, session, claim, on_epoch) \
                if not folder.finished() else "completed"
        finally:
            heartbeat.remove(claim)
            claim.release()
        if status == "lost":  # taken over while this worker was frozen
            if not trial_running(study, trial):
                raise TrialAbandoned(f"trial {trial.number}: failed and retried by another worker")
            continue  # still ours: wait for the run's new holder, then report its result
        if not folder.finished():
            raise TrialFailed(run_failure(rid, run_dir))
    result = folder.read_result()
    trial.set_user_attr("status", result["status"])
    if result["status"] == "pruned":
        raise optuna.TrialPruned()
    if result["status"] == "diverged":
        return sweep.diverged_value
    rows = io.read_jsonl(folder.metrics)
    value = objective_value(sweep, rows)
    return sweep.diverged_value if value is None else value


def _tell(study, trial, **outcome) -> None:
    """study.tell; the grid sampler's ``study.stop()`` outside ``optimize`` is harmless here.

    Optuna records the trial's state even when the sampler's after_trial raises, and the loop
    stops by counting trials, not through ``study.stop``.
    """
    try:  # a trial another worker failed meanwhile (judged dead, then thawed) keeps that state
        study.tell(trial, skip_if_finished=True, **outcome)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def propose(study, trial, space: dict, seed: int | None) -> tuple[dict, int | None]:
    """Suggest the trial's configuration, publish it whole in one write, and name an earlier
    trial holding the same configuration (this trial must then give way), or None."""
    trial.set_user_attr("sampler_seed", seed)
    params = suggest(trial, space)
    trial.set_user_attr("config", config_key(params))
    return params, duplicate_of(study, trial, params)


def _say_waiting(sweep: Sweep, study, announced: tuple) -> tuple:
    """Name the RUNNING trials this worker waits for, once each time that set changes: a sweep
    never waits silently (each is failed and retried when its worker is judged dead)."""
    from optuna.trial import TrialState

    running = tuple(sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))))
    if running and running != announced:
        def who(t) -> str:
            w = t.user_attrs.get("worker")
            return f"trial {t.number} ({w['host']} pid {w['pid']})" if w else \
                f"trial {t.number} (no worker recorded: dead if older than {STALE_AFTER_S:g} s)"
        trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        print(f"{sweep.name}: waiting for {', '.join(who(t) for t in trials)}; a trial whose worker stops "
              f"beating for {STALE_AFTER_S:g} s is failed and retried", file=sys.stderr, flush=True)
    return running


def worker_loop(sweep_path: str, results: str, url: str, n_trials: int, worker: int,
                overrides: list[str] | None = None, poll_s: float = POLL_S) -> int:
    """Ask and run trials until ``n_trials`` are COMPLETE or PRUNED, or until this session's
    last ``max_consecutive_failures`` trials all failed; returns trials run here."""
    import optuna
    from optuna.trial import TrialState

    apply_thread_budget()
    sweep = load_sweep(sweep_path, overrides)
    seed = process_seed(sweep)
    study = open_study(sweep, url, seed)
    size = space_size(sweep.space)
    session, heartbeat, done_here, repeats = uuid.uuid4().hex[:12], Heartbeat(), 0, 0
    locks = worker_lock_dir(results, sweep)
    locks.mkdir(parents=True, exist_ok=True)
    alive = create_lock(locks / f"{socket.gethostname()}.{os.getpid()}.{session}.lock")
    heartbeat.add(alive)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "lock": str(alive.lock),
          "session": os.environ.get(SESSION_ENV) or session}
    announced: tuple = ()
    try:
        while True:
            fail_stale_trials(study)
            if len(consecutive_failures(study, me["session"])) >= sweep.max_failures:
                return done_here  # the parent says why, once
            finished, running, waiting = _counted(study)
            if finished >= n_trials:
                return done_here
            if (size < float("inf") and distinct_finished(study) >= size) or repeats >= MAX_REPEATS:
                print(f"{sweep.name}: search space exhausted ({distinct_finished(study)} distinct "
                      f"configurations finished)", file=sys.stderr)
                return done_here
            if not waiting and finished + running >= n_trials:
                announced = _say_waiting(sweep, study, announced)
                time.sleep(poll_s)  # the rest are running elsewhere; they may die and need retry
                continue
            announced = ()
            trial = study.ask()
            trial.set_user_attr("worker", me)  # first: from now on its liveness is known
            before = [t for t in study.get_trials(deepcopy=False)
                      if t.number < trial.number and t.state != TrialState.FAIL]
            if len(before) >= n_trials:  # another worker asked first: do not overshoot
                trial.set_user_attr("surplus", True)
                _tell(study, trial, state=TrialState.FAIL)
                continue
            params, earlier = propose(study, trial, sweep.space, seed)
            if earlier is not None:  # the same configuration again: give way and ask anew
                trial.set_user_attr("duplicate_of", earlier)
                _tell(study, trial, state=TrialState.FAIL)
                repeats += 1
                continue
            repeats = 0
            try:
                outcome = {"values": run_trial(sweep, study, trial, params, results, session, heartbeat)}
            except TrialAbandoned as gone:
                print(f"{sweep.name}: {gone}", file=sys.stderr)
                continue
            except optuna.TrialPruned:
                outcome = {"state": TrialState.PRUNED}
            except Exception as err:  # a crashed trial stops the sweep only max_consecutive_failures in a row
                trial.set_user_attr("error", str(err) if isinstance(err, TrialFailed) else f"{type(err).__name__}: {err}")
                outcome = {"state": TrialState.FAIL}
            _tell(study, trial, **outcome)
            done_here += 1
    finally:
        heartbeat.remove(alive)  # no beat can touch its descriptor once it is closed
        heartbeat.stop()
        alive.release()


def worker_envs(workers: int) -> list[dict[str, str]]:
    """Each sweep worker's environment: on a GPU machine the visible GPUs dealt round-robin
    (worker i gets GPU i mod n), one process each; on a CPU the cores shared out."""
    gpus = visible_gpus()
    slots = [gpus[i % len(gpus)] for i in range(workers)] if gpus else [None] * workers
    return [worker_env(gpu, thread_share(slots)) for gpu in slots]


def run_sweep(sweep_path: str, results: str, workers: int = 1, n_trials: int | None = None,
              storage: str | None = None, overrides: list[str] | None = None,
              progress: bool = True) -> int:
    sweep = load_sweep(sweep_path, overrides)
    url = storage_url(sweep, results, storage)
    target = n_trials or sweep.n_trials
    study = open_study(sweep, url, create=True)  # created once, before any worker starts
    study.set_user_attr("objective", objective_text(sweep))  # recorded with the trials
    print(f"{sweep.name}: optimising {objective_text(sweep)}")
    session = uuid.uuid4().hex[:12]  # this command's workers count their failures together
    commands = [([sys.executable, "-m", "abexp.lab.sweep", sweep_path, results, url, str(target), str(i),
                  *(overrides or [])], dict(env, **{SESSION_ENV: session}))
                for i, env in enumerate(worker_envs(workers))]
    codes = supervise(commands, target, lambda: _counted(study)[0], "trial", sweep.name, progress)
    failed = consecutive_failures(study, session)
    if len(failed) >= sweep.max_failures:  # said once here, not once per trial
        print(f"{sweep.name}: stopped after {len(failed)} failed trials in a row "
              f"(max_consecutive_failures: {sweep.max_failures}); the last: {failed[-1].user_attrs['error']}",
              file=sys.stderr, flush=True)
    finished = _counted(study)[0]
    size = space_size(sweep.space)
    exhausted = size < float("inf") and distinct_finished(study) >= size
    print(f"{sweep.name}: {finished}/{target} trials finished ({url})"
          + (" -- every configuration of the space is done" if exhausted and finished < target else ""))
    return 0 if (finished >= target or exhausted) and not any(codes) and len(failed) < sweep.max_failures else 1


if __name__ == "__main__":
    from abexp.process_env import init_process_env
    init_process_env()  # first: cuBLAS reads it once per process (abexp.process_env)
    sweep_path, results, url, n, worker, *overrides = sys.argv[1:]
    worker_loop(sweep_path, results, url, int(n), int(worker), overrides)
