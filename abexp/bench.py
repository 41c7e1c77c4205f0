"""``make bench``: speed figures as ratios measured in one process, with the machine named.

    python -m abexp.bench [--steps N] [--rounds R] [--device auto|cpu|cuda] [--out results/bench]

Delay overhead: mean training step time of ResNet-20 (batch 128, synthetic CIFAR-shaped data)
at delay 32 vs delay 0, measured in interleaved rounds so drift of the machine hits both alike.
Writes ``bench.json`` and ``bench.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from abexp import io
from abexp.config import load_config
from abexp.train import Run


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


def step_timer(delay: int, model: str, batch: int, device: str, optim: str = "sgdm"):
    """A Run on synthetic data and a function that times ``n`` of its training steps."""
    cfg = load_config(None, [f"model.name={model}", "data.name=synthetic",
                             f"data.synthetic_size={batch * 8}", f"train.batch_size={batch}",
                             f"delay.steps={delay}", f"optim.name={optim}", "train.epochs=1000"])
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


def delay_overhead(device: str, steps: int, rounds: int, model: str = "resnet20", batch: int = 128) -> dict:
    timers = {d: step_timer(d, model, batch, device)[1] for d in (0, 32)}
    for t in timers.values():
        t(3)  # warm-up
    per_round = {0: [], 32: []}
    for _ in range(rounds):
        for d in (0, 32):
            per_round[d].append(timers[d](steps))
    t0, t32 = statistics.median(per_round[0]), statistics.median(per_round[32])
    return {"model": model, "batch": batch, "steps_per_round": steps, "rounds": rounds,
            "step_ms_delay0": round(t0 * 1e3, 3), "step_ms_delay32": round(t32 * 1e3, 3),
            "ratio_delay32_over_delay0": round(t32 / t0, 4), "target": "<= 1.05"}


def to_markdown(report: dict) -> str:
    lines = [f"# abexp benchmark — {report['machine']}", "",
             f"torch {report['torch']}, device {report['device']}, {report['date']}", ""]
    d = report["delay_overhead"]
    lines += ["## Delay overhead (same model, synthetic data)", "",
              "| model | batch | step ms, delay 0 | step ms, delay 32 | ratio (target ≤ 1.05) |",
              "|---|---|---|---|---|",
              f"| {d['model']} | {d['batch']} | {d['step_ms_delay0']} | {d['step_ms_delay32']} | "
              f"{d['ratio_delay32_over_delay0']} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abexp.bench")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    report = {"machine": machine_name(device), "device": str(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    report["delay_overhead"] = delay_overhead(str(device), args.steps, args.rounds)
    out = Path(args.out)
    io.write_json(out / "bench.json", report)
    md = to_markdown(report)
    io.write_text(out / "bench.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
