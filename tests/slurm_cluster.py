"""A throwaway single-node SLURM (munge + slurmctld + slurmd from Debian's packages) for tests.

Its own slurm.conf, state and spool folders and ports live in a temporary folder; the client
commands find it through SLURM_CONF. No cgroups: proctrack/linuxproc and task/none.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_reason() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [d for d in DAEMONS + ("sbatch", "sinfo") if shutil.which(d) is None
              and not Path("/usr/sbin", d).exists()]
    if absent:
        return (f"SLURM not installed ({', '.join(absent)} missing): "
                "apt-get install slurm-wlm munge (.ci/run does this as root)")
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpus_and_memory() -> tuple[int, int]:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return int(fields.get("CPUs", os.cpu_count() or 1)), int(fields.get("RealMemory", 4000))


def write_conf(folder: Path) -> Path:
    host = socket.gethostname()
    cpus, mem = _cpus_and_memory()
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""ClusterName=abexptest
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ReturnToService=2
KillWait=30
MpiDefault=none
SchedulerParameters=sched_interval=1
NodeName={host} CPUs={cpus} RealMemory={mem - 512} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=60 State=UP
""")
    return conf


def start(folder: Path) -> dict[str, str]:
    """Start the daemons; returns the environment for client commands. Raises on failure."""
    conf = write_conf(folder)
    env = dict(os.environ, SLURM_CONF=str(conf))
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, capture_output=True)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, capture_output=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == "idle":
            return env
        time.sleep(0.5)
    stop(folder, env)
    raise RuntimeError(f"slurm did not come up: see {folder / 'log'}")


def stop(folder: Path, env: dict[str, str]) -> None:
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    for pidfile in ("slurmd.pid", "slurmctld.pid"):
        try:
            os.kill(int((folder / pidfile).read_text()), 15)
        except (OSError, ValueError):
            pass
