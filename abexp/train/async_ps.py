"""Real asynchronous training (``delay.kind: async``): a parameter server and N worker processes.

The server (this process, rank 0 of a gloo group) holds the weights, the version counter
t = updates applied so far, and the optimizer state. It hands out *work items*: item j is batch
j of the run's batch sequence (epoch j // S, position j % S, abexp's seeded order and
augmentation) and the forward weights of the version current when it is handed out. A worker
computes the gradient there and sends it back; the server applies gradients one at a time with
abexp's own update rules (``abexp.sim.optim``), each with its *actual* staleness
tau = t - (version the worker used), and hands that worker the next item.

- ``delay.order: arrival``: gradients are applied in the order they arrive (announced through
  the group's store: ``arrivals`` is a counter, so the order is one sequence even when two
  arrive "at once"). ``fifo``: gradient j is update j; one that arrives early is held.
- Each update is one line of the run folder's ``trace.txt``: ``tau batch  # worker, seconds``.
  That file is a ``delay.trace`` input as it is: the simulator told both the staleness and the
  batch of every update replays the run bitwise (tests/test_async.py).
- A ``fifo`` run with N workers is the simulator at constant delay N - 1, pipeline fill
  included, bitwise: the proof that the simulator models this system.

BN: the server never runs a forward pass, so it has no running BN statistics; async runs of a
model with BN evaluate with ``eval.bn: recalibrate`` (required) and report no
``test_acc_running_bn`` (a model without BN is evaluated as it is).
The run's life (epochs, checkpoint, metrics, events, W&B, stop signals, divergence) is
``abexp.train.lifecycle``'s, as for every run: this module supplies only ``train_epoch``.

The workers are started by the server on its machine, or by torchrun or srun on any machines
(every process runs ``abexp train``; rank 0 is the server): ``launched_world``.

A checkpoint holds the items handed out but not yet applied, with the weights of their
versions; a resumed server hands them out again (the gradient of an item is a function of its
weights and batch, so it is recomputed exactly) and the trace goes on without a gap or a repeat.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from abexp.config import RunConfig, dump_yaml, load_config
from abexp.sim.schedule import lr_at
from abexp.train import preempt
from abexp.data.stream import BatchStream
from abexp.train.run import Run, batch_gradient
from abexp.train.folder import RunFolder
from abexp.train.trace_origin import Origin

TRACE = RunFolder.TRACE
TRACE_HEADER = ("# abexp async trace: one line per update, in the order applied: staleness, batch index"
                "  # worker, seconds since the run started\n")
WORKER_THREADS = 1  # torch threads of each worker process (its gradients), recorded in trace.txt
POLL_S = 1.0  # how often a waiting side checks that the other is still alive


def update_times(trace: str | Path) -> list[float]:
    """The seconds since the run started at which each update of a trace.txt was applied
    (its comment column, which ``AsyncRun.apply`` writes)."""
    return [float(line.split("#", 1)[1].split()[2]) for line in Path(trace).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


class AsyncWorkerError(RuntimeError):
    """A worker died or went silent: the run stops with this line (its checkpoint resumes it)."""


def launched_world() -> tuple[int, int] | None:
    """(rank, world) when this process is one of a group that torchrun or SLURM's srun started
    (the server is rank 0, the workers 1..N, on any machines); None when abexp starts the
    workers itself. Under srun the torch.distributed variables are derived from the step's:
    SLURM_STEP_NUM_TASKS, not SLURM_NTASKS, which a batch script of a multi-task job also has
    (a plain ``abexp train`` there starts its own workers)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_STEP_NUM_TASKS"])
    return None


def launched_env() -> None:
    """Under srun, the environment torch.distributed's env:// reads (torchrun sets it itself):
    MASTER_ADDR = the step's first node, MASTER_PORT = 20000 + (31 job id + step id) mod 20000
    (or ABEXP_MASTER_PORT), rank = SLURM_PROCID, world = SLURM_STEP_NUM_TASKS."""
    if "SLURM_PROCID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    import subprocess
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        first = nodes.split(",")[0]
    os.environ.setdefault("MASTER_ADDR", first)
    job, step = int(os.environ.get("SLURM_JOB_ID", "0")), int(os.environ.get("SLURM_STEP_ID", "0"))
    os.environ.setdefault("MASTER_PORT", os.environ.get("ABEXP_MASTER_PORT", str(20000 + (31 * job + step) % 20000)))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ["SLURM_PROCID"], os.environ["SLURM_STEP_NUM_TASKS"]
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))


def check_launched_world(cfg: RunConfig, world: int, source: str) -> None:
    """A launched async run needs exactly a server and delay.workers workers."""
    from abexp.config import ConfigError
    if world != cfg.delay.workers + 1:
        raise ConfigError(source, "delay.workers", f"{cfg.delay.workers} workers need {cfg.delay.workers + 1} "
                          f"processes (a server and the workers); torchrun/srun started {world}")


def join_launched_group(timeout: datetime.timedelta):
    """Join the group torchrun/srun describes (env://); the store our item and arrival keys use."""
    launched_env()
    dist.init_process_group("gloo", init_method="env://", timeout=timeout)
    from torch.distributed.distributed_c10d import _get_default_store
    return dist.PrefixStore("abexp", _get_default_store())


class AsyncRun(Run):
    """The parameter server of one run: ``Run``'s model, data, evaluation and checkpointing,
    with ``train_epoch`` taken by N worker processes."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, device: str = "cpu",
                 log: Callable[[str], None] = print):
        if device not in ("cpu", "auto"):
            raise ValueError("delay.kind async runs on the CPU (gloo); --device must be cpu")
        super().__init__(cfg, out_dir, "cpu", log)
        d = cfg.delay
        self.workers, self.fifo = d.workers, d.order == "fifo"
        self.stream = BatchStream(self.batches, self.steps_per_epoch)
        self.next_item = 0                     # the next item to hand out
        self.outstanding: dict[int, int] = {}  # item -> version its weights are
        self.versions: dict[int, torch.Tensor] = {}  # version -> forward weights, while in use
        self.trace_lines: list[str] = []
        self.procs: list = []
        self.store = None
        self.started = time.time()
        self.arrivals_read = 0
        self.held: dict[int, dict] = {}  # fifo: gradients that arrived before their turn
        self.items_sent = [0] * (self.workers + 1)  # per rank: items handed to it so far
        # the server's torch threads, kept for the whole run (a resume sets them back): with
        # the workers', what a replay of trace.txt needs to be bitwise (abexp.train.trace_origin)
        self.threads = torch.get_num_threads()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = super().state_dict()
        used = sorted(set(self.outstanding.values()))
        state["async"] = {"next_item": self.next_item,
                          "outstanding": [[j, v] for j, v in sorted(self.outstanding.items())],
                          "versions": {str(v): self.versions[v] for v in used},
                          "trace": list(self.trace_lines), "elapsed": time.time() - self.started,
                          "threads": self.threads}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        a = state["async"]
        self.next_item = int(a["next_item"])
        self.outstanding = {int(j): int(v) for j, v in a["outstanding"]}
        self.versions = {int(v): w.clone() for v, w in a["versions"].items()}
        self.trace_lines = list(a["trace"])
        self.started = time.time() - float(a["elapsed"])
        self.threads = int(a.get("threads", self.threads))  # absent: a checkpoint from before the record
        torch.set_num_threads(self.threads)

    def side_files(self, i: int) -> dict[str, str]:
        """trace.txt, rewritten whole with every checkpoint and at the end (lifecycle); its
        header says where the run ran, which a replay needs (abexp.train.trace_origin)."""
        origin = Origin(self.device.type, self.threads, WORKER_THREADS)
        return {TRACE: TRACE_HEADER + origin.line() + "".join(self.trace_lines)}

    # ---------------------------------------------------------------- processes
    def start_workers(self) -> None:
        """N worker processes on this machine (``python -m abexp.train.async_ps``, one torch
        thread each, killed with this process), joined by a TCP store that this process hosts;
        or, when torchrun or srun started this process as rank 0, the group they started."""
        import subprocess
        import sys
        import tempfile

        from abexp.train.preempt import die_with_parent

        world = self.workers + 1
        timeout = datetime.timedelta(seconds=self.cfg.delay.worker_timeout_s)
        if launched_world() is not None:  # torchrun / srun started the workers, maybe elsewhere
            check_launched_world(self.cfg, launched_world()[1], f"run {self.run_id}")
            self.store = join_launched_group(timeout)
            self.store.set("meta", json.dumps({"run_id": self.run_id, "num_classes": self.batches.num_classes,
                                               "channels": self.batches.channels,
                                               "input_shape": list(self.batches.input_shape)}))
            self.hand_out_first()
            return
        self.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=timeout)
        self.tmp = tempfile.TemporaryDirectory(prefix="abexp-async-")
        config = Path(self.tmp.name) / "config.yaml"
        config.write_text(dump_yaml(self.cfg))
        shape = ",".join(str(n) for n in self.batches.input_shape)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "abexp.train.async_ps", str(rank), str(world), str(self.store.port),
             str(config), str(os.getpid()), str(self.batches.num_classes), str(self.batches.channels), shape],
            env=env, preexec_fn=die_with_parent) for rank in range(1, world)]
        dist.init_process_group("gloo", store=dist.PrefixStore("pg", self.store), rank=0, world_size=world,
                                timeout=timeout)
        self.hand_out_first()

    def hand_out_first(self) -> None:
        """The first item of every worker (or, on a resume, the items in flight at the checkpoint)."""
        world = self.workers + 1
        # items handed out before a checkpoint and not applied: handed out again, same weights
        pending = sorted(self.outstanding.items())
        self.outstanding = {}
        if not pending and self.next_item == 0:
            pending = [(j, 0) for j in range(min(self.workers, self.total_steps))]
            self.next_item = len(pending)
            self.versions = {0: self.forward_weights()}
        for rank, (j, v) in zip(range(1, world), pending):
            self.hand_out(rank, j, v)
        idle = list(range(len(pending) + 1, world))
        for rank in idle:  # a resume with fewer items in flight than workers: fill up
            if self.next_item < self.total_steps:
                self.hand_out_next(rank)

    def close(self) -> None:
        """Tell every worker to stop, then end the group (idempotent)."""
        if self.store is not None:
            for rank in range(1, self.workers + 1):
                with _quiet():
                    self.store.set(f"item/{rank}/{self.items_sent[rank]}", json.dumps({"stop": True}))
            for p in self.procs:
                try:
                    p.wait(timeout=10)
                except Exception:
                    p.kill()
            with _quiet():
                dist.destroy_process_group()
            if self.procs:
                self.tmp.cleanup()
            self.store, self.procs = None, []

    def forward_weights(self) -> torch.Tensor:
        """The weights an item handed out now is computed at (LWP's prediction where asked)."""
        out = torch.empty_like(self.engine.w)
        lr = lr_at(self.engine.t, self.cfg.optim.lr, self.total_steps, self.steps_per_epoch, self.cfg.schedule)
        self.engine.optimizer.store_forward_weights(self.engine.w, lr, out=out)
        return out

    def hand_out(self, rank: int, j: int, v: int) -> None:
        x, y = self.stream.get(j)
        self.store.set(f"item/{rank}/{self.items_sent[rank]}", json.dumps({"j": j, "v": v}))
        self.items_sent[rank] += 1
        with self.talking_to(rank):
            dist.send(self.versions[v], dst=rank)
            dist.send(x.contiguous(), dst=rank)
            dist.send(y.contiguous(), dst=rank)
        self.outstanding[j] = v

    def dead_worker(self) -> AsyncWorkerError | None:
        """A worker process of ours that exited (launched workers are torchrun's/srun's to watch)."""
        for rank, p in enumerate(self.procs, 1):
            if p.poll() is not None:
                return AsyncWorkerError(f"async worker {rank} (pid {p.pid}) exited with code {p.returncode} "
                                        f"at update {self.engine.t}; the run stops here and resumes from "
                                        "its last checkpoint when run again")
        return None

    @contextlib.contextmanager
    def talking_to(self, rank: int):
        """A gloo error while sending to or receiving from a worker: name the worker that died."""
        try:
            yield
        except RuntimeError as err:
            if "Timed out" in str(err) and (not self.procs or self.procs[rank - 1].poll() is None):
                # the peer lives but did not take its data: it hangs (others may have died of
                # waiting on us meanwhile; they are not the cause)
                pid = f" (pid {self.procs[rank - 1].pid})" if self.procs else ""
                raise AsyncWorkerError(
                    f"async worker {rank}{pid} did not respond for "
                    f"{self.cfg.delay.worker_timeout_s:.0f} s (delay.worker_timeout_s) at update {self.engine.t}: "
                    "a worker hangs; the run stops here and resumes from its last checkpoint when run again") from None
            time.sleep(0.5)  # let the dead process be reaped
            raise (self.dead_worker() or AsyncWorkerError(
                f"lost the connection to async worker {rank} at update {self.engine.t}: "
                f"{str(err).splitlines()[0]}")) from None

    def hand_out_next(self, rank: int) -> None:
        t = self.engine.t
        if t not in self.versions:
            self.versions[t] = self.forward_weights()
        self.hand_out(rank, self.next_item, t)
        self.next_item += 1

    def next_arrival(self) -> dict:
        """The next gradient announced in the store, waiting for it while every worker lives."""
        key, waited = f"arrival/{self.arrivals_read}", 0.0
        while True:
            try:
                self.store.wait([key], datetime.timedelta(seconds=POLL_S))
                break
            except RuntimeError:  # not there yet (a timeout): is everyone still alive?
                waited += POLL_S
                dead = self.dead_worker()
                if dead is not None:
                    raise dead from None
                if waited >= self.cfg.delay.worker_timeout_s:
                    raise AsyncWorkerError(f"no gradient arrived for {waited:.0f} s (delay.worker_timeout_s) at "
                                           f"update {self.engine.t}: a worker hangs; the run stops here") from None
        self.arrivals_read += 1
        info = json.loads(self.store.get(key))
        grad = torch.empty_like(self.engine.w)
        with self.talking_to(info["worker"]):
            dist.recv(grad, src=info["worker"])
        info["grad"] = grad
        return info

    # ---------------------------------------------------------------- training
    def train_epoch(self) -> list[dict]:
        """Updates until the epoch's last (or a stop signal, or divergence)."""
        cfg = self.cfg
        if self.store is None:
            self.start_workers()
        start, self.step_in_epoch = self.step_in_epoch, 0
        if start == 0:
            self.reset_counters()
        end = (self.epoch + 1) * self.steps_per_epoch
        held = self.held
        lr = cfg.optim.lr
        while self.engine.t < end:
            if self.fifo and self.engine.t in held:  # held over from the last epoch
                info = held.pop(self.engine.t)
            else:
                info = self.next_arrival()
            if self.fifo and info["j"] != self.engine.t:
                held[info["j"]] = info  # early: applied in its turn; its worker waits
                continue
            ready = [info]
            while ready:
                info = ready.pop()
                lr = self.apply(info)
                if self.next_item < self.total_steps:
                    self.hand_out_next(info["worker"])
                if self.fifo and self.engine.t in held and self.engine.t < end:  # never past the epoch
                    ready.append(held.pop(self.engine.t))
            i = self.engine.t - self.epoch * self.steps_per_epoch
            if i % cfg.train.divergence_check_every == 0 and not torch.isfinite(self.engine.w).all():
                break
            if preempt.requested() and self.engine.t < end:
                self.step_in_epoch = i
                raise preempt.Preempted(f"epoch {self.epoch + 1} update {i}")
        seen = max(float(self.seen), 1.0)
        train_loss = float(self.loss_sum) / seen
        return [{"train_loss": train_loss, "train_acc": float(self.correct) / seen, "lr": lr,
                 "diverged": not math.isfinite(train_loss) or not bool(torch.isfinite(self.engine.w).all())}]

    def apply(self, info: dict) -> float:
        """Update t with the gradient of item j, computed at version v: tau = t - v."""
        t, j, v = self.engine.t, info["j"], info["v"]
        lr = lr_at(t, self.cfg.optim.lr, self.total_steps, self.steps_per_epoch, self.cfg.schedule)
        tau = t - v
        self.engine.optimizer.step(self.engine.w, info["grad"], self.versions[v], [tau], lr)
        self.engine.t += 1
        for loss in info["losses"]:
            self.loss_sum += loss
        self.correct += info["correct"]
        self.seen += info.get("seen", self.cfg.train.batch_size)  # examples, or characters
        del self.outstanding[j]
        if v not in self.outstanding.values() and v != self.engine.t:
            self.versions.pop(v, None)
        self.trace_lines.append(f"{tau} {j}  # worker {info['worker']} {time.time() - self.started:.4f}\n")
        return lr

    def evaluate(self, bn: str | None = None, split: str = "test") -> list[tuple[float, float | None]]:
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if (bn or self.cfg.eval.bn) == "running" and has_bn:  # the server has no running BN statistics
            return [(math.nan, None)]
        return super().evaluate(bn, split)

    def event_fields(self, end: bool = False) -> dict:
        return {} if end else {"processes": self.workers + 1, "async_workers": self.workers}

    def result(self, i: int = 0) -> dict:
        out = super().result(i)
        out["async_workers"], out["processes"] = self.workers, self.workers + 1
        return out


class _quiet:
    """Ignore errors while tearing down (a worker that is gone already)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return True


class WorkerModel:
    """What a worker needs to compute a gradient as ``Run`` does: model, flat views, layout.
    Its initial weights do not matter: every item brings the weights to use."""

    def __init__(self, cfg: RunConfig, num_classes: int, channels: int, input_shape: tuple):
        from abexp.sim.engine import FlatParams
        from abexp.train.catalog import build
        self.cfg, self.device, self.input_shape = cfg, torch.device("cpu"), tuple(input_shape)
        self.model = build(cfg, num_classes, self.input_shape, channels)
        self.flat = FlatParams(self.model, cfg.train.channels_last)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.train_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.model.train()


def _worker_exit(rank: int, err: RuntimeError) -> None:
    """A worker that lost its server (a timeout, a closed connection): one line on stderr, exit 1;
    the server names the cause of the run's end."""
    import sys
    lines = [line for line in str(err).splitlines() if line.strip()]
    print(f"abexp async worker {rank}: lost the server ({lines[-1] if lines else 'no message'}); exiting",
          file=sys.stderr, flush=True)
    os._exit(1)


def worker_main(rank: int, world: int, port: int, config_path: str, server_pid: int,
                num_classes: int, channels: int, input_shape: tuple) -> None:
    """A worker that the server started on its own machine: join its store, then serve."""
    torch.set_num_threads(WORKER_THREADS)
    cfg = load_config(config_path)
    timeout = datetime.timedelta(seconds=cfg.delay.worker_timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=timeout)

    def server_gone(waited: float) -> str | None:  # our parent is the server: gone, we go quietly
        return "" if os.getppid() != server_pid else None

    serve(rank, cfg, store, WorkerModel(cfg, num_classes, channels, input_shape), server_gone)


def launched_worker_main(cfg: RunConfig, source: str) -> int:
    """A worker that torchrun or srun started (rank >= 1, on any machine): join the group, learn
    the run's data shapes from the server, then serve. Its config must be the server's run."""
    from abexp.config import run_id
    torch.set_num_threads(WORKER_THREADS)
    rank, world = launched_world()
    check_launched_world(cfg, world, source)
    limit = cfg.delay.worker_timeout_s
    store = join_launched_group(datetime.timedelta(seconds=limit))
    meta = json.loads(_wait_key(store, "meta", rank, silent_for(limit)))
    if meta.get("stop"):  # the run was finished already
        store.add("released", 1)
        with _quiet():
            dist.destroy_process_group()
        return 0
    if meta["run_id"] != run_id(cfg):
        import sys
        print(f"abexp async worker {rank}: {source} is run {run_id(cfg)}, the server trains {meta['run_id']}; "
              "every process needs the same config", file=sys.stderr, flush=True)
        os._exit(2)
    model = WorkerModel(cfg, meta["num_classes"], meta["channels"], tuple(meta["input_shape"]))
    serve(rank, cfg, store, model, silent_for(limit))
    return 0


def silent_for(limit: float) -> Callable[[float], str | None]:
    """A launched worker cannot watch its server's process: a server silent for delay.worker_timeout_s
    is taken as gone (torchrun and srun end the others when one process fails)."""
    return lambda waited: (f"nothing from the server for {limit:.0f} s (delay.worker_timeout_s)"
                           if waited >= limit else None)


def release_launched_workers(cfg: RunConfig) -> None:
    """Rank 0 of a launched async run with nothing to train (finished): let the workers go."""
    store = join_launched_group(datetime.timedelta(seconds=cfg.delay.worker_timeout_s))
    store.set("meta", json.dumps({"stop": True}))
    waited = 0.0  # the store may live in this process (srun): keep it until every worker has read
    while int(store.add("released", 0)) < cfg.delay.workers and waited < cfg.delay.worker_timeout_s:
        time.sleep(0.1)
        waited += 0.1
    with _quiet():
        dist.destroy_process_group()


def _wait_key(store, key: str, rank: int, server_gone: Callable[[float], str | None]) -> bytes:
    """Wait for a key of the store while the server is there. ``server_gone(waited)``: None =
    keep waiting, "" = exit quietly, else that reason in one line and exit 1."""
    waited = 0.0
    while True:
        try:
            store.wait([key], datetime.timedelta(seconds=POLL_S))
            return store.get(key)
        except RuntimeError as err:
            waited += POLL_S
            gone = server_gone(waited)
            if gone == "":
                os._exit(0)
            if gone is not None:
                _worker_exit(rank, RuntimeError(gone))
            if "timeout" not in str(err).lower() and "timed out" not in str(err).lower():
                _worker_exit(rank, err)  # the store is unreachable: its host, the server, is gone


def serve(rank: int, cfg: RunConfig, store, model: "WorkerModel", server_gone: Callable[[float], str | None]) -> None:
    """Take an item, compute its gradient, announce it, send it; until told to stop or the
    server is gone."""
    slowdown = (cfg.delay.slowdown or [1.0] * cfg.delay.workers)[rank - 1]
    pauses = random.Random(cfg.seed * 1_000_003 + rank)
    w = torch.empty_like(model.flat.data)
    from abexp.registry import DATASETS
    tokens = DATASETS.get(cfg.data.name).input_kind == "tokens"  # ids in, a target per position out
    x = torch.empty((cfg.train.batch_size, *model.input_shape), dtype=torch.long if tokens else torch.float32)
    y = torch.empty((cfg.train.batch_size, *model.input_shape) if tokens else (cfg.train.batch_size,),
                    dtype=torch.long)
    n = 0
    while True:
        item = json.loads(_wait_key(store, f"item/{rank}/{n}", rank, server_gone))
        if item.get("stop"):
            break
        try:
            dist.recv(w, src=0)
            dist.recv(x, src=0)
            dist.recv(y, src=0)
        except RuntimeError as err:  # the server is gone or stuck: one line, not a traceback
            _worker_exit(rank, err)
        began = time.perf_counter()
        micro = cfg.train.micro_batches
        sums = batch_gradient(model, list(zip(x.chunk(micro), y.chunk(micro))), w)
        losses, correct = [float(loss) for loss, _ in sums], sum(int(c) for _, c in sums)
        if slowdown > 1.0:
            time.sleep((slowdown - 1.0) * (time.perf_counter() - began))
        if cfg.delay.pause_prob and pauses.random() < cfg.delay.pause_prob:
            time.sleep(pauses.expovariate(1.0) * cfg.delay.pause_s)
        k = store.add("arrivals", 1) - 1
        store.set(f"arrival/{k}", json.dumps({"worker": rank, "j": item["j"], "v": item["v"],
                                              "losses": losses, "correct": correct,
                                              "seen": y.numel()}))
        try:
            dist.send(model.flat.grad, dst=0)
        except RuntimeError as err:
            _worker_exit(rank, err)
        n += 1
    with _quiet():
        dist.destroy_process_group()


if __name__ == "__main__":  # a worker process, started by AsyncRun.start_workers
    import sys

    args = sys.argv[1:]
    worker_main(int(args[0]), int(args[1]), int(args[2]), args[3], int(args[4]), int(args[5]), int(args[6]),
                tuple(int(n) for n in args[7].split(",")))
