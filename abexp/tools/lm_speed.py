"""Milliseconds per AdamW training step of the character-level GPT on one CPU thread, for
sizing issue 40's study (docs/language_model.md). Random token windows: the step's cost does not
depend on the text. Usage: python -m abexp.tools.lm_speed [--steps N]."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from abexp.train.gpt import GPT, GPTConfig, loss_nats

SIZES = {  # name: (config, batch)
    "issue-0.82M": (GPTConfig(vocab=85, context=128, layers=4, heads=4, width=128), 32),
    "study-2x64": (GPTConfig(vocab=85, context=64, layers=2, heads=4, width=64), 32),
    "study-4x64": (GPTConfig(vocab=85, context=64, layers=4, heads=4, width=64), 32),
    # 8 pipeline stages need >= 8 parameter groups (embed, blocks, head): 6 or 8 layers.
    "study-6x48": (GPTConfig(vocab=85, context=64, layers=6, heads=4, width=48), 32),
    "study-8x32": (GPTConfig(vocab=85, context=64, layers=8, heads=4, width=32), 32),
    "study-6x32-b16": (GPTConfig(vocab=85, context=64, layers=6, heads=4, width=32), 16),
}


def ms_per_step(cfg: GPTConfig, batch: int, steps: int, warmup: int = 3) -> tuple[float, float, float]:
    """(median wall-clock, min wall-clock, median CPU-time) ms of forward + backward + AdamW step
    over ``steps`` steps. On a shared machine the CPU time of this (one-thread) process is the
    steadier number: wall-clock also counts the time other processes held the core."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab, (batch, cfg.context))
    y = torch.randint(0, cfg.vocab, (batch, cfg.context))
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss_nats(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
            cpu.append(1e3 * (time.process_time() - c0))
    return statistics.median(times), min(times), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=list(SIZES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.only:
        cfg, batch = SIZES[name]
        med, best, cpu = ms_per_step(cfg, batch, args.steps)
        print(f"{name}: {cfg.n_params() / 1e6:.2f}M params, {cfg.layers}x{cfg.width}, heads {cfg.heads}, "
              f"batch {batch} x context {cfg.context}: wall median {med:.0f} ms/step (min {best:.0f}), "
              f"CPU median {cpu:.0f} ms/step; 3,000 steps ~ {3 * med / 60:.1f} min wall, "
              f"{3 * cpu / 60:.1f} min CPU")


if __name__ == "__main__":
    main()
