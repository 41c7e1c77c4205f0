"""``make bench``, the parameter server (``delay.kind: async``): how many workers can one server
keep busy, and how many updates per second does a real asynchronous run make?

a. Server cost per update, for ResNet-8-, ResNet-20- and ResNet-50-sized parameter vectors:
   receive a gradient and send the next item (weights and batch) over gloo between two
   processes on this machine, and apply the update with abexp's own rule (SGDM, AB) plus the
   snapshot of the new version's forward weights -- against the cost of one worker's gradient
   (forward and backward of one batch, one thread). Their ratio is the number of workers one
   server can keep busy before it becomes the bottleneck.
b. Updates per second against N: real ``delay.kind: async`` runs (ResNet-8 on digits, free
   running), rated from their ``trace.txt`` times in the steady state (start-up, ramp and
   drain excluded).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from abexp.config import load_config, read_trace_columns
from abexp.sim.engine import DelayedSGD
from abexp.train.async_ps import WorkerModel, update_times
from abexp.train.folder import RunFolder
from abexp.train.run import batch_gradient

# model -> (input channels, side, batch) for the gradient it is compared with: the CIFAR nets at
# the studies' batch 32; ResNet-50 at ImageNet's 224 x 224, batch 8 on a CPU (scaled to 32 below).
GRADIENT_INPUTS = {"resnet8": (3, 32, 32), "resnet20": (3, 32, 32), "resnet50": (3, 224, 8)}
NOMINAL_BATCH = 32


def _echo_worker(port: int, numel: int, item_numel: int, rounds: int) -> None:
    """The worker side of the exchange: send a gradient, receive weights and a batch; repeat."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=1, world_size=2)
    grad, w, x = torch.randn(numel), torch.empty(numel), torch.empty(item_numel)
    for _ in range(rounds):
        dist.send(grad, dst=0)
        dist.recv(w, src=0)
        dist.recv(x, src=0)
    dist.destroy_process_group()


def exchange_seconds(numel: int, item_numel: int, rounds: int) -> float:
    """Median wall time of one server-side exchange: receive a gradient, send weights and batch."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=120))
    worker = mp.get_context("spawn").Process(target=_echo_worker, args=(store.port, numel, item_numel, rounds + 1))
    worker.start()
    try:
        dist.init_process_group("gloo", store=store, rank=0, world_size=2)
        grad, w, x = torch.empty(numel), torch.randn(numel), torch.randn(item_numel)
        times = []
        for _ in range(rounds + 1):  # the first exchange sets up the connection: not counted
            start = time.perf_counter()
            dist.recv(grad, src=1)
            dist.send(w, dst=1)
            dist.send(x, dst=1)
            times.append(time.perf_counter() - start)
        dist.destroy_process_group()
    finally:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()
    return statistics.median(times[1:])


def server_cost(model: str, optim: str, rounds: int) -> dict:
    """Server seconds per update (exchange + apply + snapshot) vs one worker's gradient, one thread."""
    channels, side, batch = GRADIENT_INPUTS[model]
    cfg = load_config(None, ["data.name=synthetic", f"train.batch_size={batch}", "delay.kind=async",
                             "delay.workers=4", f"optim.name={optim}", "eval.bn=recalibrate"])
    # the model named directly: ResNet-50 passes no validation here (no ImageNet folder), and
    # only the async worker's model, rule and loss are used
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": model})})
    worker = WorkerModel(cfg, 10, channels, (channels, side, side))
    engine = DelayedSGD(worker.flat.data, worker.flat.sizes, cfg.optim, cfg.delay, cfg.seed)
    numel = engine.w.numel()
    grad, stale = torch.randn(numel) * 1e-3, engine.w.clone()
    snapshot = torch.empty_like(engine.w)

    def apply() -> None:  # the server's work per update besides the exchange (AsyncRun.apply, forward_weights)
        engine.optimizer.step(engine.w, grad, stale, [3], 1e-3)
        engine.optimizer.store_forward_weights(engine.w, 1e-3, out=snapshot)

    apply()
    apply_times = []
    for _ in range(rounds):
        start = time.perf_counter()
        apply()
        apply_times.append(time.perf_counter() - start)
    x = torch.randn(batch, channels, side, side)
    y = torch.randint(0, 10, (batch,))
    w = worker.flat.data.clone()
    batch_gradient(worker, [(x, y)], w)
    grad_times = []
    for _ in range(max(2, rounds // 3)):
        start = time.perf_counter()
        batch_gradient(worker, [(x, y)], w)
        grad_times.append(time.perf_counter() - start)
    gradient_s = statistics.median(grad_times) * NOMINAL_BATCH / batch
    exchange_s = exchange_seconds(numel, NOMINAL_BATCH * channels * side * side, rounds)
    apply_s = statistics.median(apply_times)
    server_s = exchange_s + apply_s
    return {"model": model, "optim": optim, "params": numel, "exchange_ms": round(exchange_s * 1e3, 3),
            "apply_ms": round(apply_s * 1e3, 3), "server_ms": round(server_s * 1e3, 3),
            "gradient_ms": round(gradient_s * 1e3, 1), "gradient_batch_measured": batch,
            "workers_kept_busy": round(gradient_s / server_s, 1)}


def updates_per_second(workers: list[int], updates: int = 88) -> list[dict]:
    """Free-running async runs (ResNet-8, digits, batch 16) with N workers: updates per second
    in the steady state, from trace.txt's times between update N - 1 and update U - N (the N
    first gradients all start at once and the N last have no successors: ramp and drain)."""
    from abexp.train.start import train_run
    rows = []
    for n in workers:
        with tempfile.TemporaryDirectory(prefix="abexp-bench-async-") as tmp:
            cfg = load_config(None, ["model.name=resnet8", "data.name=digits", f"data.subset={updates * 16}",
                                     "data.test_subset=64", "train.batch_size=16", "train.epochs=1",
                                     "optim.name=ab", "optim.lr=0.01", "eval.bn=recalibrate",
                                     "delay.kind=async", f"delay.workers={n}"])
            train_run(cfg, Path(tmp) / "run", "cpu", log=lambda s: None)
            trace = RunFolder(Path(tmp) / "run").trace
            times = update_times(trace)
            delays, _ = read_trace_columns(str(trace))
        lo, hi = n - 1, len(times) - n
        rate = (hi - lo) / (times[hi] - times[lo])
        rows.append({"workers": n, "updates": len(times), "updates_per_s": round(rate, 1),
                     "mean_staleness": round(sum(delays) / len(delays), 2), "max_staleness": max(delays)})
    base = rows[0]["updates_per_s"]
    for r in rows:
        r["speedup_over_first"] = round(r["updates_per_s"] / base, 2)
    return rows


def report(rounds: int, workers: list[int]) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker and the server of a CPU async run
    try:
        cost = [server_cost(model, optim, rounds) for model in GRADIENT_INPUTS for optim in ("sgdm", "ab")]
        return {"server_cost": cost, "updates_per_second": updates_per_second(workers)}
    finally:
        torch.set_num_threads(before)


def to_markdown(section: dict) -> list[str]:
    lines = ["## Parameter server (delay.kind async): cost per update, one thread", "",
             "| model | params | rule | exchange ms | apply + snapshot ms | server ms / update | "
             f"gradient ms (batch {NOMINAL_BATCH}) | workers one server keeps busy |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['optim']} | {r['exchange_ms']} | {r['apply_ms']} | "
              f"{r['server_ms']} | {r['gradient_ms']} | {r['workers_kept_busy']} |" for r in section["server_cost"]]
    lines += ["", "Exchange: receive a gradient, send weights and a batch (gloo, two processes on this "
              "machine). Gradient: forward and backward of one batch (CIFAR nets at 32 x 32; ResNet-50 at "
              "224 x 224, measured at batch 8 and scaled to 32).", "",
              "| workers N | updates | updates / s | vs N = first | mean staleness | max staleness |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['updates']} | {r['updates_per_s']} | {r['speedup_over_first']} | "
              f"{r['mean_staleness']} | {r['max_staleness']} |" for r in section["updates_per_second"]]
    lines += ["", "Free-running async runs, ResNet-8 on digits, batch 16, AB; rated from trace.txt's "
              "times in the steady state (updates N - 1 to U - N: worker start-up, ramp and drain excluded). On a CPU every worker needs a core: past the core "
              "count more workers add staleness, not updates.", ""]
    return lines
