"""SLURM backend: requests checked against sinfo, and a real single-node SLURM running a grid
through scancel and a time-limit signal with every run trained once and nothing lost."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from abexp import io
from abexp.config import ConfigError, load_config
from abexp.lab.runner import runs_dir
from abexp.lab.slurm import (Node, Request, check_request, gres_gpus, parse_mem_mb, parse_sinfo,
                         parse_time_min, requeue_self, script_text)
from abexp.lab.spec import load_spec
from abexp.train.start import train_run

from slurm_cluster import missing_reason, start, stop
from test_runner import assert_each_run_once, events

SINFO = """debug*|2|8000|(null)|1:00:00
gpu|32|256000|gpu:a100:4(S:0-1)|2-00:00:00
gpu|64|512000+|gpu:a100:8,gpu:t4:2|2-00:00:00
"""


def test_sinfo_and_slurm_syntax_are_parsed():
    nodes = parse_sinfo(SINFO)
    assert [(n.partition, n.default, n.cpus, n.mem_mb, n.gpus) for n in nodes] == [
        ("debug", True, 2, 8000, 0), ("gpu", False, 32, 256000, 4), ("gpu", False, 64, 512000, 10)]
    assert [n.time_limit_min for n in nodes] == [60, 2880, 2880]
    assert gres_gpus("(null)") == 0 and gres_gpus("gpu:2,mps:100") == 2
    assert [parse_time_min(t) for t in ("90", "30:30", "4:00:00", "1-2", "1-2:30", "infinite", "soon")] == \
        [90, 30.5, 240, 1560, 1590, float("inf"), None]
    assert [parse_mem_mb(m) for m in ("4000", "500M", "16G", "1T", "lots")] == [4000, 500, 16384, 1024 ** 2, None]


@pytest.mark.parametrize("request_kwargs, flag", [
    ({"cpus_per_task": 8}, "--cpus-per-task"),
    ({"gpus_per_task": 1}, "--gpus-per-task"),
    ({"mem": "9G"}, "--mem"),
    ({"mem": "plenty"}, "--mem"),
    ({"time": "2:00:00"}, "--time"),
    ({"partition": "big"}, "--partition"),
    ({"partition": "gpu", "gpus_per_task": 16}, "--gpus-per-task"),
    ({"partition": "gpu", "cpus_per_task": 128}, "--cpus-per-task"),
])
def test_a_request_no_node_can_satisfy_names_its_flag(request_kwargs, flag):
    with pytest.raises(ConfigError) as err:
        check_request(Request(**request_kwargs), parse_sinfo(SINFO))
    assert err.value.source == flag


def test_gpus_only_where_the_partition_has_them():
    nodes = parse_sinfo(SINFO)
    assert check_request(Request(), nodes).gpus_per_task == 0  # CPU partition: no gres line
    assert check_request(Request(partition="gpu"), nodes, gpus_per_run=2).gpus_per_task == 2
    assert check_request(Request(partition="gpu", gpus_per_task=0), nodes).gpus_per_task == 0
    assert check_request(Request(), None).gpus_per_task == 0  # no sinfo: nothing asked for
    cpu = script_text(check_request(Request(), nodes), ["w"], Path("/f"), "x")
    gpu = script_text(check_request(Request(partition="gpu", mem="16G", time="1:00:00"), nodes),
                      ["w"], Path("/f"), "x")
    assert "gres" not in cpu and "#SBATCH --gres=gpu:1" in gpu
    assert "#SBATCH --mem=16G" in gpu and "#SBATCH --time=1:00:00" in gpu and "--signal=B:USR1@" in gpu
    assert cpu.rstrip().endswith("exec w")


def test_slurm_cpus_per_task_sets_the_torch_threads():
    code = "from abexp.lab.runner import apply_thread_budget as a; import torch; a(); print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "ABEXP_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, SLURM_CPUS_PER_TASK="1"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_a_rank_of_a_run_takes_its_share_of_the_task_cpus():
    code = ("from abexp.lab.runner import apply_thread_budget as a; import torch; a(4); "
            "print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "ABEXP_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, SLURM_CPUS_PER_TASK="8"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"  # 8 CPUs, 4 ranks of one run


def test_the_default_cpus_per_task_feed_each_gpu_rank_its_loader(tmp_path, monkeypatch):
    """Without --cpus-per-task: (data.workers + 1) per process of a run for ImageNet (its
    DataLoader workers and the rank itself), 2 for in-memory data, never more than the
    partition's largest node; the sbatch line says so. An explicit flag is kept."""
    from abexp.cli import main
    from abexp.lab import slurm
    from test_imagenet_ddp import write_image_folder
    root = write_image_folder(tmp_path / "imnet", classes=2, train_per_class=4, val_per_class=1, size=16)
    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: feed
        base:
          model: {{name: resnet18}}
          data: {{name: imagenet, root: {root}, workers: 12, image_size: 16}}
          train: {{epochs: 1, batch_size: 8}}
    """))
    submitted = []
    monkeypatch.setattr(slurm, "query_nodes", lambda: parse_sinfo(SINFO))
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(slurm, "sbatch", lambda script, *extra: submitted.append(script.read_text()) or "7")

    def cpus(*flags) -> int:
        assert main(["run", str(spec), "--backend", "slurm", "--results", str(tmp_path / "r"),
                     "--slurm-folder", str(tmp_path / "slurm"), "--partition", "gpu", *flags]) == 0
        [line] = [l for l in submitted.pop().splitlines() if l.startswith("#SBATCH --cpus-per-task=")]
        return int(line.split("=")[1])

    assert cpus("--gpus-per-run", "2") == 13 * 2   # 12 loader workers + the rank, per GPU
    assert cpus("--gpus-per-run", "8") == 64       # 104 wanted: the largest gpu node has 64
    assert cpus("--gpus-per-run", "2", "--cpus-per-task", "6") == 6
    # in-memory data: no loader workers, the old default of 2
    assert check_request(Request(), parse_sinfo(SINFO), workers=slurm.loader_workers(
        [load_config(None, ["data.name=digits", "data.workers=12"])])).cpus_per_task == 2
    assert check_request(Request(), None, workers=3).cpus_per_task == 4  # no sinfo: one rank


def test_a_cancelled_session_is_not_requeued(tmp_path, monkeypatch):
    (tmp_path / "task.sbatch").write_text("#!/bin/bash\n")
    (tmp_path / "stop").write_text("")
    monkeypatch.setenv("ABEXP_SLURM_FOLDER", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not call scontrol or sbatch"))
    assert requeue_self(lambda msg: None) is None


# ---------------------------------------------------------------- a real SLURM

@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    try:
        env = start(folder)
    except (RuntimeError, subprocess.CalledProcessError) as err:
        pytest.skip(f"slurm could not start: {err}")
    yield dict(env, WANDB_MODE="disabled", ABEXP_POLL_S="0.5", ABEXP_HEARTBEAT_S="1")
    stop(folder, env)


def write_spec(path: Path, epochs: int) -> Path:
    path.write_text(textwrap.dedent(f"""
        name: {path.stem}
        base:
          model: {{name: resnet8}}
          data: {{name: digits, subset: 256, test_subset: 64}}
          train: {{epochs: {epochs}, batch_size: 32}}
          optim: {{lr: 0.05}}
          delay: {{steps: 2}}
        variants:
          sgdm: {{optim.name: sgdm}}
          ab: {{optim.name: ab}}
    """))
    return path


def abexp(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "abexp.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def squeue(env) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True)
    return out.stdout.split("\n") if out.stdout.strip() else []


def wait_for(what, predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def holder_job(run_dir: Path) -> str | None:
    """The SLURM job training this run, once it has logged an epoch (from its claim)."""
    try:
        if not (run_dir / "metrics.jsonl").read_text().strip():
            return None
        return json.loads((run_dir / "claim.lock").read_text()).get("slurm_job")
    except (OSError, json.JSONDecodeError):
        return None


@pytest.mark.parametrize("flags, flag", [
    (["--cpus-per-task", "512"], "--cpus-per-task"),
    (["--gpus-per-task", "1"], "--gpus-per-task"),
    (["--mem", "100T"], "--mem"),
    (["--partition", "nope"], "--partition"),
    (["--time", "3:00:00"], "--time"),
])
def test_impossible_requests_fail_before_submitting(tmp_path, slurm_env, flags, flag):
    spec = write_spec(tmp_path / "s.yaml", epochs=1)
    proc = abexp(slurm_env, "run", spec, "--backend", "slurm", "--results", tmp_path / "r",
                 "--slurm-folder", tmp_path / "slurm", *flags)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and flag in proc.stderr
    assert not (tmp_path / "slurm").exists() and not squeue(slurm_env)


def test_grid_survives_scancel_and_time_limit_signal(tmp_path, slurm_env):
    """Two array tasks, one run each: one is scancel-ed (resubmitted), the other gets the
    time-limit USR1 (requeued under its own id). The grid finishes by itself, each run trained
    once, and the weights equal an uninterrupted run's."""
    spec = write_spec(tmp_path / "grid.yaml", epochs=16)
    results, folder = tmp_path / "r", tmp_path / "slurm"
    proc = abexp(slurm_env, "run", spec, "--backend", "slurm", "--results", results,
                 "--slurm-folder", folder, "--array", "2", "--cpus-per-task", "1")
    assert proc.returncode == 0, proc.stderr
    plan = load_spec(spec).expand()
    dirs = [runs_dir(results) / r.run_id for r in plan]
    jobs = wait_for("both runs to be mid-training", lambda: (lambda j: j if all(j) else None)(
        [holder_job(d) for d in dirs]))
    subprocess.run(["scancel", jobs[0]], env=slurm_env, check=True)
    subprocess.run(["scancel", "--batch", "--signal=USR1", jobs[1]], env=slurm_env, check=True)
    wait_for("every run to finish", lambda: all((d / "result.json").exists() for d in dirs))
    wait_for("the queue to empty", lambda: not squeue(slurm_env), timeout=60)

    assert_each_run_once(spec, results, epochs=16)
    for d in dirs:  # resumed once, from the checkpoint its signal left
        starts = [e for e in events(d) if e["event"] == "start"]
        assert len(starts) == 2 and starts[1]["from_step"] > 0, starts
    recorded = (next(folder.glob("*/jobs.txt"))).read_text().split()
    assert len(recorded) == 3  # the submission, and one replacement per interrupted task
    logs = "".join(p.read_text() for p in folder.glob("*/*.out"))
    for task in jobs:
        assert f"task {task}: checkpointed and requeued as job" in logs

    torch.set_num_threads(1)  # as the tasks ran (SLURM_CPUS_PER_TASK=1)
    try:
        for run, d in zip(plan, dirs):
            ref = train_run(run.config, tmp_path / "ref" / run.run_id, device="cpu", log=lambda s: None)
            assert ref["test_acc"] == json.loads((d / "result.json").read_text())["test_acc"]
            a, b = io.load_torch(tmp_path / "ref" / run.run_id / "model.pt"), io.load_torch(d / "model.pt")
            assert all(torch.equal(a[k], b[k]) for k in a), run.run_id
    finally:
        torch.set_num_threads(2)


def test_abexp_cancel_stops_for_good_and_keeps_the_checkpoint(tmp_path, slurm_env):
    spec = write_spec(tmp_path / "cancel.yaml", epochs=40)
    results, folder = tmp_path / "r", tmp_path / "slurm"
    assert abexp(slurm_env, "run", spec, "--backend", "slurm", "--results", results, "--slurm-folder",
                 folder, "--array", "1", "--cpus-per-task", "1").returncode == 0
    run_dir = runs_dir(results) / load_spec(spec).expand()[0].run_id
    wait_for("an epoch", lambda: holder_job(run_dir))
    proc = abexp(slurm_env, "cancel", "--slurm-folder", folder)
    assert proc.returncode == 0 and "cancelled 1 job" in proc.stdout, proc.stderr
    wait_for("the queue to empty", lambda: not squeue(slurm_env), timeout=60)
    time.sleep(2)
    assert not squeue(slurm_env) and not (run_dir / "result.json").exists()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "claim.lock").exists()
    assert len(next(folder.glob("*/jobs.txt")).read_text().split()) == 1


def test_srun_starts_an_async_run_whose_server_and_workers_equal_the_simulator(tmp_path, slurm_env):
    """delay.kind async under `srun -n 4`: SLURM's task ids become the group's ranks (server =
    task 0, MASTER_ADDR = the job's first node), and the fifo run is the simulator at D = 2."""
    from test_async import BASE, assert_same_run
    from test_async_launched import ASYNC, write_config
    config = write_config(tmp_path / "a.yaml", BASE + ["optim.name=sgdm"] + ASYNC)
    env = dict(slurm_env, OMP_NUM_THREADS="1", ABEXP_THREADS="1")
    proc = subprocess.run(["srun", "-n", "4", "--overcommit", "--time", "5", sys.executable, "-m", "abexp.cli",
                           "train", str(config), "--out", str(tmp_path / "async")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(load_config(None, BASE + ["optim.name=sgdm", "delay.steps=2"]), tmp_path / "sim", log=lambda s: None)
    finally:
        torch.set_num_threads(before)
    assert_same_run(tmp_path / "async", tmp_path / "sim")
