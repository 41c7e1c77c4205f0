"""delay.kind async: a real parameter server with worker processes, against the simulator.

The two exactness claims of docs/async.md, on CPU with one thread per process: a ``fifo`` run
with N workers equals the simulator at constant delay N - 1 bitwise (weights and metrics),
and a free-running run's trace.txt, replayed with ``delay.kind: trace``, reproduces it bitwise.
Then the faults: a worker killed mid-run stops the run with one line, and a rerun resumes from
the checkpoint to the same weights, with every update once in the trace."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abexp.config import ConfigError, load_config, read_trace_columns
from abexp.train.start import train_run

BASE = ["data.name=digits", "model.name=resnet8", "data.subset=128", "data.test_subset=64",
        "train.batch_size=32", "train.epochs=2", "optim.lr=0.05", "optim.momentum=0.9",
        "optim.weight_decay=0.01", "schedule.name=cosine", "eval.bn=recalibrate"]
COMPARED = ("train_loss", "train_acc", "lr", "test_loss", "test_acc", "step")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use one thread: so does the simulator we compare with
    yield
    torch.set_num_threads(before)


def parameters(folder):
    state = torch.load(folder / "model.pt", weights_only=True)
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def metrics(folder):
    return [{k: row[k] for k in COMPARED} for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def assert_same_run(a, b):
    pa, pb = parameters(a), parameters(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert metrics(a) == metrics(b)


@pytest.mark.parametrize("optim", ["sgdm", "ab"])
def test_fifo_with_n_workers_is_the_simulator_at_constant_delay_n_minus_1(tmp_path, optim):
    cfg = BASE + [f"optim.name={optim}"]
    # worker 1 three times slower: the others' gradients arrive early and are held, also across
    # an epoch's end (a held chain once ran one update into the next epoch: caught here)
    train_run(load_config(None, cfg + ["delay.kind=async", "delay.workers=3", "delay.order=fifo",
                                       "delay.slowdown=[3, 1, 1]"]),
              tmp_path / "async", log=lambda s: None)
    train_run(load_config(None, cfg + ["delay.steps=2"]), tmp_path / "sim", log=lambda s: None)
    assert_same_run(tmp_path / "async", tmp_path / "sim")
    delays, order = read_trace_columns(str(tmp_path / "async" / "trace.txt"))
    assert delays == [min(t, 2) for t in range(8)] and order == list(range(8))  # 4 steps x 2 epochs


def test_a_free_running_trace_replayed_by_the_simulator_reproduces_the_run(tmp_path, monkeypatch):
    """Also where the replay's process would pick other threads and a GPU: the trace's header
    says where the run ran (server 2 threads, workers 1, CPU) and the replay runs there."""
    cfg = BASE + ["optim.name=ab", "data.subset=256"]
    torch.set_num_threads(2)  # the server's; each worker runs one thread whatever this is
    result = train_run(load_config(None, cfg + ["delay.kind=async", "delay.workers=3", "delay.slowdown=[1, 1, 3]"]),
                       tmp_path / "async", log=lambda s: None)
    trace = tmp_path / "async" / "trace.txt"
    assert "# device: cpu, threads: 2, worker threads: 1\n" in trace.read_text()
    delays, order = read_trace_columns(str(trace))
    assert sorted(order) == list(range(16)) and max(delays) > 2  # the slow worker's gradients are staler
    # whatever the order, the sum of staleness is fixed by the protocol (docs/async.md): item j
    # is handed out at version 0 (j < N) or j - N + 1, and the T updates are t = 0..T-1
    T, N = 16, 3
    versions = [0] * N + [j - N + 1 for j in range(N, T)]
    assert sum(delays) == sum(range(T)) - sum(versions) == (N - 1) * (2 * T - N) // 2
    replay_cfg = load_config(None, cfg + ["delay.kind=trace", f"delay.trace={trace}"])
    # asked for another device: refused with one line naming the trace, nothing written
    with pytest.raises(ConfigError, match="ran on cpu") as err:
        train_run(replay_cfg, tmp_path / "gpu", device="cuda", log=lambda s: None)
    assert str(trace) in str(err.value) and not (tmp_path / "gpu").exists()
    torch.set_num_threads(1)  # this process's default: not the server's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # device auto would pick a GPU
    replay = train_run(replay_cfg, tmp_path / "sim", log=lambda s: None)
    assert_same_run(tmp_path / "async", tmp_path / "sim")
    assert replay["test_acc"] == result["test_acc"] and replay["device"] == "cpu"
    assert torch.get_num_threads() == 1  # the process's own threads again


KILL_CFG = BASE + ["optim.name=sgdm", "train.epochs=3", "data.subset=512"]


def start_async_train(tmp_path, extra=()):
    """``abexp train`` of a 3-epoch fifo run with 3 workers, as a subprocess; returns it and its
    worker pids once epoch 1's checkpoint is written (workers busy, the run mid-way)."""
    args = [f"--set={s}" for s in KILL_CFG + ["delay.kind=async", "delay.workers=3", "delay.order=fifo", *extra]]
    (tmp_path / "c.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "abexp.cli", "train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "async"), *args]
    env = dict(os.environ, ABEXP_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = tmp_path / "async" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = [int(p) for p in subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "abexp.train.async_ps"],
                                              capture_output=True, text=True).stdout.split()]
    assert checkpoint.exists() and len(workers) == 3
    return proc, workers, cmd, env


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def assert_rerun_completes_the_run_exactly(tmp_path, cmd, env):
    """The rerun resumes from the checkpoint: every update once in the trace, in order, and the
    run equal to the simulator at D = 2 (fifo, 3 workers), bitwise."""
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    delays, order = read_trace_columns(str(tmp_path / "async" / "trace.txt"))
    assert order == list(range(48)) and delays == [min(t, 2) for t in range(48)]  # no gap, no repeat
    train_run(load_config(None, KILL_CFG + ["delay.steps=2"]), tmp_path / "sim", log=lambda s: None)
    assert_same_run(tmp_path / "async", tmp_path / "sim")


def test_a_killed_worker_stops_the_run_and_a_rerun_resumes_it_exactly(tmp_path):
    """A worker killed in epoch 2 ends the run with one line; the rerun resumes from epoch 1's
    checkpoint and ends equal to the simulator, bitwise."""
    proc, workers, cmd, env = start_async_train(tmp_path)
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "async worker" in err and "exited with code" in err
    assert not (tmp_path / "async" / "result.json").exists()
    assert_rerun_completes_the_run_exactly(tmp_path, cmd, env)


def test_a_killed_server_takes_its_workers_with_it_and_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL to the server (the abexp train process) mid-run: its workers exit too (none is
    left computing for a dead server), and a rerun resumes from the checkpoint: the items in
    flight are handed out again, no update is applied twice, the trace has no gap."""
    proc, workers, cmd, env = start_async_train(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))
    assert not (tmp_path / "async" / "result.json").exists()
    assert_rerun_completes_the_run_exactly(tmp_path, cmd, env)


def test_a_hung_worker_fails_the_run_after_worker_timeout_s_with_one_line(tmp_path):
    """A worker frozen (SIGSTOP) mid-run: in fifo order every later gradient waits for its one,
    so no gradient arrives; after delay.worker_timeout_s the run stops with a line that says so,
    and leaves no worker process behind."""
    proc, workers, cmd, env = start_async_train(tmp_path, ["delay.worker_timeout_s=20"])
    os.kill(workers[0], signal.SIGSTOP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "delay.worker_timeout_s" in err and "a worker hangs" in err
    assert "Traceback" not in err
    assert not any(map(alive, workers))
    assert not (tmp_path / "async" / "result.json").exists()


@pytest.mark.parametrize("extra, key", [
    (["delay.kind=async"], "delay.workers"),
    (["delay.kind=async", "delay.workers=0"], "delay.workers"),
    (["delay.kind=async", "delay.workers=3", "delay.slowdown=[1, 2]"], "delay.slowdown"),
    (["delay.kind=async", "delay.workers=2", "delay.slowdown=[1, 0.5]"], "delay.slowdown"),
    (["delay.kind=async", "delay.workers=2", "delay.steps=4"], "delay.steps"),
    (["delay.kind=async", "delay.workers=2", "eval.bn=running"], "eval.bn"),
    (["delay.workers=2"], "delay.workers"),
    (["delay.order=fifo"], "delay.order"),
])
def test_bad_async_options_name_their_key(extra, key):
    base = [b for b in BASE if not b.startswith("eval.bn")] + (["eval.bn=recalibrate"] if "eval.bn=running" not in extra else [])
    with pytest.raises(ConfigError) as err:
        load_config(None, base + extra)
    assert err.value.key == key


def test_a_trace_whose_batch_column_is_not_this_runs_order_is_refused(tmp_path):
    trace = tmp_path / "t.txt"
    trace.write_text("".join(f"0 {j}\n" for j in [0, 1, 1, 3, 4, 5, 6, 7]))  # batch 2 missing, 1 twice
    with pytest.raises(ConfigError, match="each of the run's 8 batches once"):
        train_run(load_config(None, BASE + ["delay.kind=trace", f"delay.trace={trace}"]), tmp_path / "r",
                  log=lambda s: None)


def test_a_send_that_times_out_to_a_live_worker_names_that_worker_as_hanging():
    """The race CI once hit: the server blocks sending to a frozen worker while another worker
    dies of waiting; the run's line must name the frozen one (alive, timed out), not the dead one."""
    from types import SimpleNamespace

    from abexp.train.async_ps import AsyncRun, AsyncWorkerError
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    died = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    died.wait()
    server = SimpleNamespace(procs=[frozen, died], engine=SimpleNamespace(t=21),
                             cfg=SimpleNamespace(delay=SimpleNamespace(worker_timeout_s=20.0)))
    try:
        with pytest.raises(AsyncWorkerError, match=rf"async worker 1 \(pid {frozen.pid}\) did not respond for 20 s "
                                                   r"\(delay.worker_timeout_s\) at update 21: a worker hangs"):
            with AsyncRun.talking_to(server, 1):
                raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for send")
    finally:
        frozen.kill()
        frozen.wait()
