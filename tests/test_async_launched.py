"""delay.kind async with processes that torchrun or srun started (on any machines): the server is
rank 0, the workers ranks 1..N, joined over env://. The same exactness as when abexp starts the
workers itself: a fifo run with N workers equals the simulator at constant delay N - 1 bitwise,
whether its processes are torchrun's on one host or on two hosts (two UTS namespaces with their
own hostnames, a torchrun agent each), or srun's in a SLURM job."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from abexp.config import load_config
from abexp.train.start import train_run

from test_async import BASE, assert_same_run, one_thread  # noqa: F401  (fixture)

ASYNC = ["delay.kind=async", "delay.workers=3", "delay.order=fifo", "delay.slowdown=[3, 1, 1]",
         "delay.worker_timeout_s=120"]


def write_config(path: Path, overrides: list[str]) -> Path:
    tree: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


def env() -> dict:
    return dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", ABEXP_THREADS="1")


def simulated(tmp_path, optim="sgdm") -> Path:
    train_run(load_config(None, BASE + [f"optim.name={optim}", "delay.steps=2"]), tmp_path / "sim", log=lambda s: None)
    return tmp_path / "sim"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_abexp_train_nproc_runs_the_async_run_under_torchrun_equal_to_the_simulator(tmp_path):
    config = write_config(tmp_path / "a.yaml", BASE + ["optim.name=sgdm"] + ASYNC)
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "train", str(config), "--nproc", "4",
                           "--out", str(tmp_path / "async")], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "async", simulated(tmp_path))
    # run again: finished, so the server releases the workers torchrun started and all exit 0
    again = subprocess.run([sys.executable, "-m", "abexp.cli", "train", str(config), "--nproc", "4",
                            "--out", str(tmp_path / "async")], env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root")
def test_a_server_and_workers_on_two_hosts_equal_the_simulator(tmp_path):
    """Two torchrun agents, one per "host" (its own UTS namespace and hostname), 2 processes
    each: the server and worker 1 on the first, workers 2 and 3 on the second."""
    config = write_config(tmp_path / "a.yaml", BASE + ["optim.name=ab"] + ASYNC)
    port = free_port()
    procs = []
    for node in (0, 1):
        torchrun = (f"{sys.executable} -m torch.distributed.run --nnodes 2 --node-rank {node} "
                    f"--nproc-per-node 2 --master-addr 127.0.0.1 --master-port {port} "
                    f"-m abexp.cli train {config} --out {tmp_path / 'async'}")
        script = f"hostname abexp-host{node} && echo \"$(hostname)\" > {tmp_path}/host{node} && exec {torchrun}"
        procs.append(subprocess.Popen(["unshare", "--uts", "sh", "-c", script], env=env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert {(tmp_path / f"host{n}").read_text().strip() for n in (0, 1)} == {"abexp-host0", "abexp-host1"}
    workers = {line.split("#")[1].split()[1] for line in (tmp_path / "async" / "trace.txt").read_text().splitlines()
               if not line.startswith("#")}
    assert workers == {"1", "2", "3"}  # each host's workers did updates
    train_run(load_config(None, BASE + ["optim.name=ab", "delay.steps=2"]), tmp_path / "sim", log=lambda s: None)
    assert_same_run(tmp_path / "async", tmp_path / "sim")


def test_a_launched_group_of_the_wrong_size_is_one_line_exit_2(tmp_path):
    config = write_config(tmp_path / "a.yaml", BASE + ["optim.name=sgdm"] + ASYNC)
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "train", str(config), "--nproc", "3",
                           "--out", str(tmp_path / "x")], env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--nproc" in proc.stderr and "4" in proc.stderr and not (tmp_path / "x").exists()
    # three processes that srun started (a step's variables, no torch.distributed ones): refused
    # by every rank before any process group forms
    slurm = dict(env(), SLURM_NTASKS="3", SLURM_STEP_NUM_TASKS="3", SLURM_PROCID="1", SLURM_JOB_ID="7")
    slurm.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "train", str(config), "--out", str(tmp_path / "x")],
                          env=slurm, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "delay.workers" in proc.stderr and "started 3" in proc.stderr


def test_a_batch_script_of_a_multi_task_job_is_not_a_launched_group(monkeypatch):
    """sbatch -n 4's batch script has SLURM_NTASKS=4 and SLURM_PROCID=0 but is one process: an
    abexp train there starts its own workers; only an srun step (SLURM_STEP_NUM_TASKS) is a group."""
    from abexp.train.async_ps import launched_world
    for key in ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launched_world() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert launched_world() == (2, 4)
