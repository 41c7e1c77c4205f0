"""``make bench``: speed figures as ratios measured in one process, with the machine named.

    python -m abexp.tools.bench [--steps N] [--rounds R] [--packs 1 2 4 ...] [--device auto|cpu|cuda]

a. delay overhead: ResNet-20 step time (batch 128, synthetic CIFAR-shaped data) at delay 32 vs
   delay 0, and with per-stage pipeline delays (16 stages) vs constant delay 32, in interleaved
   rounds so drift of the machine hits all alike;
b. abexp's path (data on the device as uint8, batched augmentation, flat-buffer engine) vs a
   naive baseline written here (torch DataLoader over PIL images with per-sample torchvision
   transforms, fp32, eager, torch.optim.SGD): time per CIFAR-10 epoch (390 steps), extrapolated
   from the measured step time;
c. grid throughput: K runs sharing one device, packed into one network (abexp.train.packed) or as K
   processes started together (``--runs-per-gpu K``),
   K = 1, 2, 4, ...: run-epochs per hour, the best mode and K, and its speed-up over K = 1 and
   over the naive one-run baseline;
d. torch.compile: eager vs compiled step time (ResNet-20, AB, delay 32);
e. the parameter server of ``delay.kind: async`` (``abexp.tools.bench_async``): its cost per
   update against one gradient, and updates per second against the number of workers;
f. AB's update against SGDM's on a ResNet-50-sized flat vector (one thread, interleaved rounds):
   the per-tensor cosines should cost about one more pass over memory (target <= 2.5x);
g. ATen operations of one packed training step for K = 1, 8, 32 runs (torch.profiler on the CPU,
   a proxy for a GPU's kernel launches): in all, and inside the K delay engines;
h. (``lm``, ``abexp.tools.bench_lm``) the study's char-GPT on Shakespeare, one CPU thread:
   characters per second at D = 0 and D = 16 (target <= 1.05), Muon's update against AdamW's.
Writes ``bench.json`` and ``bench.md`` under ``--out``, after every section. Each section runs
on its own (``abexp.tools.sections``): one that raises, or runs past ``--limit-s``, is listed as
failed with its error line and the others are still measured; the exit status is then 1.
``--skip`` leaves sections out (gpu-check skips e, the CPU-only parameter server).
"""

from __future__ import annotations

import argparse
import platform
import queue
import statistics
import os
import time
from pathlib import Path

import torch

from abexp import io
from abexp.process_env import init_process_env
from abexp.config import load_config
from abexp.tools import bench_async, bench_lm
from abexp.train.run import Run


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_timer(delay: int, model: str, batch: int, device: str, optim: str = "sgdm",
               extra: tuple[str, ...] = ()):
    """A Run on synthetic data and a function that times ``n`` of its training steps."""
    cfg = load_config(None, [f"model.name={model}", "data.name=synthetic",
                             f"data.synthetic_size={batch * 8}", f"train.batch_size={batch}",
                             f"delay.steps={delay}", f"optim.name={optim}", "train.epochs=1000", *extra])
    run = Run(cfg, "/nonexistent", device, log=lambda s: None)
    batches = [b for b in run.batches.epoch(0)]

    def time_steps(n: int) -> float:
        sync(run.device)
        start = time.perf_counter()
        for i in range(n):
            x, y = batches[i % len(batches)]
            run.train_step(x, y, 0.01)
        sync(run.device)
        return (time.perf_counter() - start) / n

    return run, time_steps


def delay_overhead(device: str, steps: int, rounds: int, model: str = "resnet20", batch: int = 128,
                   stages: int = 16) -> dict:
    """Step time at delay 0, at constant delay 32, and with per-stage pipeline delays (S stages,
    2(S-1-s), assembled from S slices of the buffer): the last against the constant delay."""
    pipeline = ("delay.kind=pipeline", f"delay.stages={stages}")
    timers = {"d0": step_timer(0, model, batch, device)[1], "d32": step_timer(32, model, batch, device)[1],
              "pipe": step_timer(0, model, batch, device, extra=pipeline)[1]}
    for t in timers.values():
        t(3)  # warm-up
    per_round = {k: [] for k in timers}
    for _ in range(rounds):
        for k, timer in timers.items():
            per_round[k].append(timer(steps))
    t0, t32, tp = (statistics.median(per_round[k]) for k in ("d0", "d32", "pipe"))
    return {"model": model, "batch": batch, "steps_per_round": steps, "rounds": rounds,
            "step_ms_delay0": round(t0 * 1e3, 3), "step_ms_delay32": round(t32 * 1e3, 3),
            "ratio_delay32_over_delay0": round(t32 / t0, 4), "target": "<= 1.05",
            "stages": stages, "step_ms_pipeline": round(tp * 1e3, 3),
            "ratio_pipeline_over_delay32": round(tp / t32, 4)}


STEPS_PER_CIFAR_EPOCH = 50000 // 128


def naive_step_time(device: torch.device, steps: int, batch: int = 128) -> float:
    """The typical PyTorch pipeline: per-sample PIL transforms in a DataLoader, fp32, eager."""
    import numpy as np
    import torch.nn.functional as F
    from abexp.train.models import build_model
    from abexp.tv_compat import import_torchvision

    T = import_torchvision().transforms
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * (steps + 2), 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, len(images))
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])

    class Cifar(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return tf(Image.fromarray(images[i])), int(labels[i])

    loader = torch.utils.data.DataLoader(Cifar(), batch_size=batch, shuffle=True, num_workers=2,
                                         pin_memory=device.type == "cuda", drop_last=True)
    torch.manual_seed(0)
    model = build_model("resnet20").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    it = iter(loader)

    def step():
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()  # the usual per-step read of the logged loss (a host sync)

    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def path_vs_naive(device: str, steps: int) -> dict:
    dev = torch.device(device)
    abexp_s = step_timer(0, "resnet20", 128, device)[1]
    abexp_s(2)
    ours = abexp_s(steps)
    naive = naive_step_time(dev, steps)
    return {"steps_measured": steps, "abexp_epoch_s": round(ours * STEPS_PER_CIFAR_EPOCH, 2),
            "naive_epoch_s": round(naive * STEPS_PER_CIFAR_EPOCH, 2),
            "speedup_abexp_over_naive": round(naive / ours, 3), "target": ">= 5x (GPU)"}


def packed_step_time(device: str, k: int, steps: int, batch: int = 128) -> float:
    from abexp.train.packed import PackedRun

    cfgs = [load_config(None, ["model.name=resnet20", "data.name=synthetic", f"data.synthetic_size={batch * 4}",
                               f"train.batch_size={batch}", f"seed={i}", "train.epochs=1000",
                               f"optim.name={'ab' if i % 2 else 'sgdm'}", f"delay.steps={(i * 4) % 33}"])
            for i in range(k)]
    pack = PackedRun(cfgs, ["/nonexistent"] * k, device, log=lambda s: None)
    batches = [list(b.epoch(0)) for b in pack.batches]
    lrs = [0.01] * k

    def run(n):
        sync(pack.device)
        start = time.perf_counter()
        for i in range(n):
            xs = [b[i % len(b)] for b in batches]
            pack.train_step([x for x, _ in xs], [y for _, y in xs], lrs)
        sync(pack.device)
        return (time.perf_counter() - start) / n

    run(1)
    return run(steps)


def _shared_device_worker(device: str, threads: int, steps: int, barrier, done) -> None:
    """One of K processes sharing the device: build a run, wait for the others, time ``steps``."""
    torch.set_num_threads(threads)
    timer = step_timer(0, "resnet20", 128, device)[1]
    timer(1)  # warm-up, outside the measured window
    barrier.wait()
    timer(steps)
    done.put(1)


def processes_step_time(device: str, k: int, steps: int) -> float:
    """Wall time for K separate processes (``abexp run --runs-per-gpu K``, or K CPU workers with
    the threads split between them as the runner does) to each take one step."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, done = ctx.Barrier(k + 1), ctx.Queue()
    threads = max(1, torch.get_num_threads() // k) if device == "cpu" else 1
    procs = [ctx.Process(target=_shared_device_worker, args=(device, threads, steps, barrier, done))
             for _ in range(k)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=600)
        start = time.perf_counter()
        finished = 0
        while finished < k:
            try:
                finished += done.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a benchmark worker failed (exit codes {[p.exitcode for p in procs]})")
        elapsed = time.perf_counter() - start
    except BaseException:  # a failure or the section's time limit: the workers are not waited for
        for proc in procs:
            proc.kill()
        raise
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return elapsed / steps


def grid_throughput(device: str, packs: list[int], procs: list[int], steps: int, naive_epoch_s: float | None) -> dict:
    """Run-epochs per hour with K runs sharing the device, packed in one process or as K processes."""
    rows = []
    for mode, ks, timer in (("packed", packs, packed_step_time), ("processes", procs, processes_step_time)):
        for k in ks:
            step_s = timer(device, k, steps)  # time for all K runs to take one step each
            epoch_s = step_s * STEPS_PER_CIFAR_EPOCH
            rows.append({"mode": mode, "K": k, "step_s": round(step_s, 4), "epoch_s_per_run": round(epoch_s / k, 3),
                         "run_epochs_per_hour": round(3600 * k / epoch_s, 1)})
    best = max(rows, key=lambda r: r["run_epochs_per_hour"])
    one = next((r for r in rows if r["K"] == 1), None)
    naive_rate = 3600 / naive_epoch_s if naive_epoch_s else None  # None: figure b failed
    return {"rows": rows, "best_mode": best["mode"], "best_K": best["K"],
            "best_epoch_s_per_run": best["epoch_s_per_run"],
            "best_speedup_over_K1": round(best["run_epochs_per_hour"] / one["run_epochs_per_hour"], 3) if one else None,
            "best_speedup_over_naive": round(best["run_epochs_per_hour"] / naive_rate, 3) if naive_rate else None,
            "target": ">= 20x over naive; <= 1 s per ResNet-20 epoch per run (GPU)"}


def compile_speedup(device: str, steps: int) -> dict:
    """Step time of eager vs torch.compile'd training (delay 32, AB), after compiling."""
    times = {}
    for name, extra in (("eager", ()), ("compiled", ("train.compile=true",))):
        timer = step_timer(32, "resnet20", 128, device, "ab", extra)[1]
        start = time.perf_counter()
        timer(1)
        first = time.perf_counter() - start
        timer(2)
        times[name] = (timer(steps), first)
    return {"eager_step_ms": round(times["eager"][0] * 1e3, 2),
            "compiled_step_ms": round(times["compiled"][0] * 1e3, 2),
            "compile_s": round(times["compiled"][1], 1),
            "speedup": round(times["eager"][0] / times["compiled"][0], 3)}


def ab_apply_ratio(rounds: int, model: str = "resnet50", device: str = "cpu") -> dict:
    """Median time of one optimizer update (``DelayedOptimizer.step``, delay 3) for SGDM and for
    AB (per-tensor cosines) on ``model``'s parameter sizes, in interleaved rounds, one thread."""
    from abexp.config import OptimCfg
    from abexp.sim.optim import DelayedOptimizer
    from abexp.train.models import build_model

    sizes = [p.numel() for p in build_model(model, 10).parameters()]
    dev = torch.device(device)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the parameter server of a CPU async run
    try:
        gen = torch.Generator().manual_seed(0)
        grad = (torch.randn(sum(sizes), generator=gen) * 1e-3).to(dev)
        rules = {name: (DelayedOptimizer(OptimCfg(name=name, lr=1e-3, momentum=0.9, rho=1.0), sizes, [3.0], dev),
                        torch.randn(sum(sizes), generator=gen).to(dev)) for name in ("sgdm", "ab")}
        times: dict[str, list[float]] = {name: [] for name in rules}
        g = torch.empty_like(grad)
        for r in range(rounds + 1):
            for name, (opt, w) in rules.items():
                g.copy_(grad)  # the step consumes its gradient (AB scales it in place)
                sync(dev)
                start = time.perf_counter()
                opt.step(w, g, w, [3], 1e-3)
                sync(dev)
                if r:  # round 0 warms up (first-touch of the optimizer's buffers)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    sgdm, ab = (statistics.median(times[n]) for n in ("sgdm", "ab"))
    return {"model": model, "params": sum(sizes), "tensors": len(sizes), "rounds": rounds,
            "sgdm_ms": round(sgdm * 1e3, 3), "ab_ms": round(ab * 1e3, 3),
            "ratio_ab_over_sgdm": round(ab / sgdm, 3), "target": "<= 2.5"}


def _step_ops(pack, k: int) -> tuple[int, int]:
    """Top-level ATen calls of one ``pack.train_step`` (after a first one), in all and inside
    the delay engines: the vectorised update's ``begin``/``finish`` and every engine stepped on
    its own (forward-weight storage, stale-weight read and the update)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    own = [pack.engines[i] for i in pack.order[pack.n_together:]]
    for target in own + ([pack.together] if pack.together is not None else []):
        for name in ("begin", "finish"):  # label the engines' share of the step
            method = getattr(target, name)

            def labelled(*a, _method=method, **kw):
                with record_function("abexp.engine"):
                    return _method(*a, **kw)
            setattr(target, name, labelled)
    batches = [next(iter(b.epoch(0))) for b in pack.batches]
    step = lambda: pack.train_step([x for x, _ in batches], [y for _, y in batches], [0.01] * k)  # noqa: E731
    step()  # the first step builds the step tables
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total = engine_ops = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent, inside, nested = event.cpu_parent, False, False
        while parent is not None:
            nested |= parent.name.startswith("aten::")
            inside |= parent.name == "abexp.engine"
            parent = parent.cpu_parent
        if not nested:  # a top-level ATen call (its own sub-calls are not counted again)
            total += 1
            engine_ops += inside
    return total, engine_ops


def packed_op_counts(packs: list[int], model: str = "resnet8", batch: int = 8) -> dict:
    """ATen operations of one packed training step (torch.profiler on the CPU: each top-level
    ATen call is a kernel launch or more on a GPU), in all and inside the delay engines, for K
    packed runs, half SGDM and half AB, delays 0, 4, 8, ...: with the vectorised update
    (abexp.sim.batched) and with each run's own engine in a loop (``vectorise=False``, the
    code before it)."""
    from abexp.train.packed import PackedRun

    rows = []
    for k in packs:
        cfgs = [load_config(None, [f"model.name={model}", "data.name=synthetic", f"data.synthetic_size={batch * 2}",
                                   f"train.batch_size={batch}", f"seed={i}", "train.epochs=1000",
                                   f"optim.name={'ab' if i % 2 else 'sgdm'}", f"delay.steps={(i * 4) % 33}"])
                for i in range(k)]
        row = {"K": k}
        for vectorise, tag in ((True, ""), (False, "loop_")):
            pack = PackedRun(cfgs, ["/nonexistent"] * k, "cpu", log=lambda s: None, vectorise=vectorise)
            row[f"{tag}aten_ops"], row[f"{tag}engine_ops"] = _step_ops(pack, k)
        row["loop_engine_ops_per_run"] = round(row["loop_engine_ops"] / k, 1)
        rows.append(row)
    return {"model": model, "rows": rows}


def to_markdown(report: dict) -> str:
    lines = [f"# abexp benchmark — {report['machine']}", "",
             f"torch {report['torch']}, device {report['device']}, {report['date']}", ""]
    if "delay_overhead" in report:
        d = report["delay_overhead"]
        lines += ["## Delay overhead (same model, synthetic data)", "",
                  "| model | batch | step ms, delay 0 | step ms, delay 32 | ratio (target ≤ 1.05) |",
                  "|---|---|---|---|---|",
                  f"| {d['model']} | {d['batch']} | {d['step_ms_delay0']} | {d['step_ms_delay32']} | "
                  f"{d['ratio_delay32_over_delay0']} |", ""]
        if "step_ms_pipeline" in d:
            lines += [f"Per-stage delays ({d['stages']} stages, 2(S-1-s)): {d['step_ms_pipeline']} ms per step, "
                      f"{d['ratio_pipeline_over_delay32']}× the constant delay 32 (target ≤ 1.05).", ""]
    if "path_vs_naive" in report:
        p = report["path_vs_naive"]
        lines += ["## abexp path vs naive DataLoader pipeline (ResNet-20, one CIFAR-10 epoch)", "",
                  "| abexp epoch s | naive epoch s | speed-up (target ≥ 5×) |", "|---|---|---|",
                  f"| {p['abexp_epoch_s']} | {p['naive_epoch_s']} | {p['speedup_abexp_over_naive']} |", ""]
    if "compile" in report:
        c = report["compile"]
        lines += ["## torch.compile (ResNet-20, AB, delay 32)", "",
                  "| eager step ms | compiled step ms | speed-up | compile time s |", "|---|---|---|---|",
                  f"| {c['eager_step_ms']} | {c['compiled_step_ms']} | {c['speedup']} | {c['compile_s']} |", ""]
    if "grid_throughput" in report:
        g = report["grid_throughput"]
        lines += ["## Grid throughput: K runs sharing one device (packed in one process, or K processes)", "",
                  "| mode | K | step s (all K runs) | epoch s per run | run-epochs / hour |", "|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['K']} | {r['step_s']} | {r['epoch_s_per_run']} | {r['run_epochs_per_hour']} |"
                  for r in g["rows"]]
        lines += ["", f"best: {g['best_mode']}, K = {g['best_K']}, {g['best_epoch_s_per_run']} s per run-epoch: "
                      f"{g['best_speedup_over_K1']}× over K = 1, {g['best_speedup_over_naive']}× over the naive "
                      "one-run pipeline (target ≥ 20×, ≤ 1 s per run-epoch)", ""]
    if "async" in report:
        lines += bench_async.to_markdown(report["async"])
    if "packed_ops" in report:
        o = report["packed_ops"]
        lines += [f"## ATen operations of one packed training step ({o['model']}, torch.profiler on the CPU)", "",
                  "| K runs | whole step | in the vectorised update | whole step, per-run engines (before) "
                  "| in the engines (per run) |", "|---|---|---|---|---|"]
        lines += [f"| {r['K']} | {r['aten_ops']} | {r['engine_ops']} | {r['loop_aten_ops']} | "
                  f"{r['loop_engine_ops']} ({r['loop_engine_ops_per_run']}) |" for r in o["rows"]]
        lines += [""]
    if "cli_help" in report:
        h = report["cli_help"]
        lines += ["## `abexp --help` (median of fresh processes)", "",
                  "| plain s (target < 0.3) | with a 1 s plugin in ABEXP_PLUGINS s | ratio (target ≤ 1.1) |",
                  "|---|---|---|", f"| {h['help_s']} | {h['help_with_plugin_s']} | {h['ratio_plugin_over_plain']} |", ""]
    if "ab_apply" in report:
        a = report["ab_apply"]
        lines += [f"## AB's update vs SGDM's ({a['model']}-sized vector: {a['params']:,} parameters in "
                  f"{a['tensors']} tensors, one thread)", "",
                  "| SGDM ms | AB ms | ratio (target ≤ 2.5) |", "|---|---|---|",
                  f"| {a['sgdm_ms']} | {a['ab_ms']} | {a['ratio_ab_over_sgdm']} |", ""]
    if "lm" in report:
        lines += bench_lm.markdown(report["lm"])
    for name, line in report.get("failed", {}).items():
        lines.append(f"- {name} FAILED: {line}")
    return "\n".join(lines)


SECTIONS = ("delay_overhead", "path_vs_naive", "compile", "grid_throughput", "async", "ab_apply", "packed_ops",
            "cli_help", "lm")


def cli_help(rounds: int = 5) -> dict:
    """``abexp --help`` wall time (median of ``rounds`` fresh processes), and the same with a
    plugin named in ABEXP_PLUGINS: plugins load only when a command needs the registries, so
    the ratio should be 1 (target: help under 0.3 s; ratio <= 1.1)."""
    import statistics
    import subprocess
    import sys
    import tempfile

    def median_s(env: dict) -> float:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "abexp.cli", "--help"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with tempfile.TemporaryDirectory() as folder:  # a plugin that costs a second to import
        Path(folder, "slow_plugin.py").write_text("import time\ntime.sleep(1.0)\n")
        plain = dict(os.environ)
        plain.pop("ABEXP_PLUGINS", None)
        with_plugin = dict(plain, ABEXP_PLUGINS="slow_plugin",
                           PYTHONPATH=os.pathsep.join(filter(None, [folder, plain.get("PYTHONPATH")])))
        help_s, plugin_s = median_s(plain), median_s(with_plugin)
    return {"help_s": round(help_s, 3), "help_with_plugin_s": round(plugin_s, 3),
            "ratio_plugin_over_plain": round(plugin_s / help_s, 3), "rounds": rounds}


def run_bench(device: torch.device, steps: int, rounds: int, packs: list[int], procs: list[int] | None,
              async_workers: list[int], sections: tuple[str, ...], out: Path,
              limits: dict[str, float] | None = None, log=lambda m: None) -> dict:
    """The named sections, each on its own (abexp.tools.sections): one that fails or overruns its
    limit is reported as failed with its error line; bench.json and bench.md are rewritten after
    every section, so they always hold what finished."""
    from abexp.tools.sections import run_sections

    report = {"machine": machine_name(device), "device": str(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    procs = procs if procs is not None else ([2, 4, 8, 16, 32] if device.type == "cuda" else [2, 4])
    naive_s = lambda: (report.get("path_vs_naive") or {}).get("naive_epoch_s")  # noqa: E731 - None if it failed
    parts = {"delay_overhead": lambda: delay_overhead(str(device), steps, rounds),
             "path_vs_naive": lambda: path_vs_naive(str(device), steps),
             "compile": lambda: compile_speedup(str(device), steps),
             "grid_throughput": lambda: grid_throughput(str(device), packs, procs, max(2, steps // 3), naive_s()),
             # the server is a CPU process (gloo), whatever the device
             "async": lambda: bench_async.report(max(20, steps), async_workers),
             "ab_apply": lambda: ab_apply_ratio(max(3, rounds), device=str(device)),
             "packed_ops": lambda: packed_op_counts([1, 8, 32]),
             "cli_help": lambda: cli_help(max(3, rounds)),
             "lm": lambda: bench_lm.report(max(5, steps), max(3, rounds))}  # the CPU, one thread
    limits = limits or {}

    def save(rep: dict) -> None:
        io.write_json(out / "bench.json", rep)
        io.write_text(out / "bench.md", to_markdown(rep))

    return run_sections([(name, parts[name], limits.get(name)) for name in SECTIONS if name in sections],
                        report, save, log)


def main(argv: list[str] | None = None) -> int:
    init_process_env()  # first: cuBLAS reads it once per process (abexp.process_env)
    parser = argparse.ArgumentParser(prog="python -m abexp.tools.bench")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--procs", type=int, nargs="*", default=None,
                        help="K for K processes sharing the device (default: 2 4 8 16 32 on a GPU, "
                             "2 4 on a CPU, where each process needs its own memory and threads)")
    parser.add_argument("--only-delay", action="store_true", help="just figure a (fast)")
    parser.add_argument("--only-async", action="store_true", help="just figure e (the parameter server)")
    parser.add_argument("--only-ab", action="store_true", help="just figure f (AB's update vs SGDM's)")
    parser.add_argument("--only-help", action="store_true", help="just abexp --help's time (plugins lazy)")
    parser.add_argument("--only-ops", action="store_true",
                        help="just figure g (ATen operations of one packed step, K = 1, 8, 32)")
    parser.add_argument("--only-lm", action="store_true",
                        help="just the char-GPT: chars/s at D = 0 and 16, Muon's update vs AdamW's")
    parser.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, help="sections not to run")
    parser.add_argument("--limit-s", type=float, default=None,
                        help="wall-clock limit of each section: one past it is reported as failed")
    parser.add_argument("--async-workers", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="N for the updates-per-second runs of figure e")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    only = {"delay_overhead": args.only_delay, "async": args.only_async, "ab_apply": args.only_ab,
            "packed_ops": args.only_ops, "cli_help": args.only_help, "lm": args.only_lm}
    sections = tuple(s for s, on in only.items() if on) or SECTIONS
    sections = tuple(s for s in sections if s not in args.skip)
    limits = dict.fromkeys(sections, args.limit_s) if args.limit_s else None
    report = run_bench(device, args.steps, args.rounds, args.packs, args.procs, args.async_workers, sections,
                       Path(args.out), limits, log=lambda m: print(m, flush=True))
    print(to_markdown(report))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
