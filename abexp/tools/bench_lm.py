"""``make bench`` section ``lm`` (issue 40 item 7): the study's char-GPT on Shakespeare
(experiments/shakespeare_gpt.yaml's model and batch), one thread: characters per second of a
whole training step at D = 0 and at D = 16 (the delay's overhead, target <= 1.05 as for
ResNets), and the cost of Muon's update (Newton-Schulz on the hidden matrices, AdamW on the
rest) against AdamW's, each timed on one fixed gradient through the run's own engine."""

from __future__ import annotations

import statistics
import time

import torch

from abexp.config import load_config
from abexp.train.run import Run

STUDY = ["model.name=gpt", "model.layers=6", "model.width=32", "model.heads=4", "data.name=shakespeare",
         "data.context=64", "train.batch_size=16", "data.subset=256", "data.test_subset=16",
         "train.epochs=1000", "optim.lr=0.003"]


def _run(*extra: str) -> Run:
    return Run(load_config(None, STUDY + list(extra)), "/nonexistent", "cpu", log=lambda s: None)


def report(steps: int = 10, rounds: int = 3) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a study run is one CPU thread
    try:
        runs = {"d0": _run("optim.name=adamw"), "d16": _run("optim.name=adamw", "delay.steps=16"),
                "muon": _run("optim.name=muon")}
        batches = {k: list(r.batches.epoch(0)) for k, r in runs.items()}

        def time_steps(key: str, n: int) -> float:
            run, data = runs[key], batches[key]
            start = time.perf_counter()
            for i in range(n):
                x, y = data[i % len(data)]
                run.train_step(x, y, 0.003)
            return (time.perf_counter() - start) / n

        for key in runs:
            time_steps(key, 3)  # warm-up (and fill D = 16's history past its first slots)
        per = {k: [] for k in runs}
        for _ in range(rounds):
            for key in runs:
                per[key].append(time_steps(key, steps))
        t0, t16, tm = (statistics.median(per[k]) for k in ("d0", "d16", "muon"))
        x, _ = batches["d0"][0]
        chars = x.numel()

        updates = {name: _run(f"optim.name={name}") for name in ("adamw", "muon")}
        grad = torch.randn(updates["adamw"].flat.grad.numel(), generator=torch.Generator().manual_seed(0)) * 1e-3
        upd = {name: [] for name in updates}
        for r in range(rounds * steps + 1):
            for name, run in updates.items():
                fn = lambda w, run=run: run.flat.grad.copy_(grad)  # noqa: E731 -- a fixed gradient
                start = time.perf_counter()
                run.engine.step(fn, 0.003)
                if r:  # the first warms up (first touch of the optimizer's buffers)
                    upd[name].append(time.perf_counter() - start)
        adamw, muon = (statistics.median(upd[n]) for n in ("adamw", "muon"))
    finally:
        torch.set_num_threads(before)
    params = updates["adamw"].flat.grad.numel()
    return {"model": "gpt 6x32, 4 heads, context 64", "params": params, "batch_chars": chars,
            "steps_per_round": steps, "rounds": rounds,
            "step_ms_delay0": round(t0 * 1e3, 3), "step_ms_delay16": round(t16 * 1e3, 3),
            "chars_per_s_delay0": round(chars / t0), "chars_per_s_delay16": round(chars / t16),
            "ratio_delay16_over_delay0": round(t16 / t0, 4), "target": "<= 1.05",
            "step_ms_muon_delay0": round(tm * 1e3, 3),
            "update_ms_adamw": round(adamw * 1e3, 3), "update_ms_muon": round(muon * 1e3, 3),
            "ratio_muon_over_adamw_update": round(muon / adamw, 3),
            "muon_update_share_of_step": round(muon / tm, 3)}


def markdown(r: dict) -> list[str]:
    return [f"## Char-GPT on Shakespeare ({r['model']}, {r['params']:,} parameters, {r['batch_chars']:,} "
            "characters per step, one thread)", "",
            "| chars/s, D=0 | chars/s, D=16 | step ms D=0 | step ms D=16 | ratio (target ≤ 1.05) |",
            "|---|---|---|---|---|",
            f"| {r['chars_per_s_delay0']:,} | {r['chars_per_s_delay16']:,} | {r['step_ms_delay0']} | "
            f"{r['step_ms_delay16']} | {r['ratio_delay16_over_delay0']} |", "",
            "| AdamW update ms | Muon update ms | ratio | Muon step ms, D=0 | Muon's update, share of it |",
            "|---|---|---|---|---|",
            f"| {r['update_ms_adamw']} | {r['update_ms_muon']} | {r['ratio_muon_over_adamw_update']} | "
            f"{r['step_ms_muon_delay0']} | {r['muon_update_share_of_step']} |", ""]
