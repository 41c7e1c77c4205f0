"""Packing: K runs of one grid trained together in one process on one device.

A small ResNet at batch 128 leaves a GPU mostly idle; K runs as one network of grouped
convolutions (abexp.train.models.PackedCifarResNet) fill it. Each run keeps everything of its own:
seed (initial weights, data order, augmentation, delay draws), lr, momentum, rho, optimizer and
delay — each has its own DelayedSGD engine on a run-major copy of its weights. What runs in a
pack must share: the CIFAR model, the data, epochs, batch size, precision and evaluation.

Each run's folder is written exactly as ``abexp.train.run`` writes it (the checkpoint format is the
same, so a packed run can be resumed unpacked and vice versa).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from abexp import io
from abexp.config import RunConfig, dump_yaml, run_id
from abexp.data.images import Batches
from abexp.data.load import load_image_data
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.train.models import CIFAR_DEPTHS, PackedCifarResNet, build_model
from abexp.sim.pipeline import run_stages
from abexp.sim.schedule import lr_at
from abexp.train.run import (CHECKPOINT, CONFIG, METRICS, RESULT, WEIGHTS, _event, autocast, cpu_state,
                         recalibrated_bn, resolve_device, result_record, set_determinism, set_precision)

SHARED_KEYS = ("model", "data", "train", "eval")


def pack_key(cfg: RunConfig) -> str | None:
    """Runs with equal keys can share a pack; None: this run cannot be packed."""
    if (cfg.model.name not in CIFAR_DEPTHS or cfg.data.name == "imagenet" or cfg.train.micro_batches != 1
            or cfg.train.channels_last or cfg.train.compile):
        return None
    dump = cfg.model_dump()
    return json.dumps({k: dump[k] for k in SHARED_KEYS}, sort_keys=True)


def _run_major_index(model: PackedCifarResNet, flat: FlatParams) -> torch.Tensor:
    """Index so that ``flat.data[index]`` is run 0's weights, then run 1's, ... (each in
    CifarResNet parameter order): a run's chunk of every packed tensor, tensor by tensor."""
    k, offsets, pieces = model.runs, [], []
    start = 0
    for size in flat.sizes:
        offsets.append(start)
        start += size
    for run in range(k):
        for off, size in zip(offsets, flat.sizes):
            chunk = size // k
            pieces.append(torch.arange(off + run * chunk, off + (run + 1) * chunk))
    return torch.cat(pieces).to(flat.data.device)


class PackedRun:
    def __init__(self, cfgs: list[RunConfig], out_dirs: list[Path], device: str = "auto",
                 log: Callable[[str], None] = print):
        keys = {pack_key(c) for c in cfgs}
        if len(keys) != 1 or None in keys:
            raise ValueError("runs in a pack must share model, data, train and eval settings")
        self.cfgs, self.outs, self.log, self.k = cfgs, [Path(o) for o in out_dirs], log, len(cfgs)
        self.ids = [run_id(c) for c in cfgs]
        shared = cfgs[0]
        self.device = resolve_device(device)
        set_precision(shared.train.precision)
        set_determinism(shared.train.deterministic, self.device)
        data = load_image_data(shared, self.device)  # one copy on the device for all runs
        self.batches = [Batches(data, shared.train.batch_size, shared.data.augment, c.seed) for c in cfgs]
        singles = []
        for c in cfgs:  # each run's initial weights exactly as an unpacked run draws them
            torch.manual_seed(c.seed)
            singles.append(build_model(c.model.name, data.num_classes, in_channels=data.channels))
        self.model = PackedCifarResNet(CIFAR_DEPTHS[shared.model.name], self.k, data.num_classes,
                                       data.channels)
        self.model.load_runs(singles).to(self.device)
        self.flat = FlatParams(self.model)
        self.index = _run_major_index(self.model, self.flat)
        self.inverse = torch.empty_like(self.index)
        self.inverse[self.index] = torch.arange(len(self.index), device=self.index.device)
        sizes = [s // self.k for s in self.flat.sizes]
        w = self.flat.data[self.index].view(self.k, -1)
        staged = [run_stages(c, m, sizes, self.batches[0].input_shape) for c, m in zip(cfgs, singles)]
        self.stage_maps = [m for _, m in staged]
        self.engines = [DelayedSGD(w[i], sizes, c.optim, c.delay, c.seed, staged[i][0])
                        for i, c in enumerate(cfgs)]
        self.fwd = torch.empty_like(self.flat.data)  # run-major forward weights
        self.steps_per_epoch = self.batches[0].steps_per_epoch
        self.total_steps = self.steps_per_epoch * shared.train.epochs
        self.epoch, self.wall_s = 0, 0.0
        self.histories: list[list[dict]] = [[] for _ in cfgs]
        self.status = ["running"] * self.k
        self.reset_counters()

    # ---------------------------------------------------------------- state (per run, Run's format)
    def run_state(self, i: int) -> dict:
        buffers = self.model.run_state(i, buffers_only=True)
        return {"epoch": self.epoch, "device": self.device.type, "engine": self.engines[i].state_dict(), "buffers": buffers,
                "rng": {"torch": torch.get_rng_state()}, "history": self.histories[i],
                "wall_s": self.wall_s, "run_id": self.ids[i]}

    def load_run_state(self, i: int, state: dict) -> None:
        self.engines[i].load_state_dict(state["engine"])
        self.histories[i] = list(state["history"])
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            target = buffers[name]
            if name.endswith("num_batches_tracked"):
                target.copy_(value)
            else:
                target.chunk(self.k, dim=0)[i].copy_(value)
        self.epoch, self.wall_s = int(state["epoch"]), float(state["wall_s"])

    def use_current_weights(self) -> None:
        self.fwd.copy_(torch.cat([e.w for e in self.engines]))
        self.flat.data.copy_(self.fwd[self.inverse])

    # ---------------------------------------------------------------- training
    def train_step(self, xs: list[torch.Tensor], ys: list[torch.Tensor], lrs: list[float]) -> None:
        begun = [e.begin(lr) for e, lr in zip(self.engines, lrs)]
        torch.cat([w for _, w in begun], out=self.fwd)
        self.flat.data.copy_(self.fwd[self.inverse])
        self.flat.grad.zero_()
        x = torch.stack(xs, dim=1).flatten(1, 2)
        y = torch.stack(ys, dim=1)
        with autocast(self.device, self.cfgs[0].train.precision):
            logits = self.model(x).float()
        losses = F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none",
                                 label_smoothing=self.cfgs[0].train.label_smoothing).mean(0)
        losses.sum().backward()  # runs are independent: d(sum)/d(run k) = run k's gradient
        grads = self.flat.grad[self.index].view(self.k, -1)
        for i, (engine, (tau, w_fwd), lr) in enumerate(zip(self.engines, begun, lrs)):
            if self.active[i]:  # a run that diverged mid-epoch stops where an unpacked run would
                engine.finish(grads[i], w_fwd, tau, lr)
                self.seen[i] += len(y)
        self.loss_sum += losses.detach().double() * len(y) * self.active_mask
        self.correct += (logits.argmax(2) == y).sum(0) * self.active_mask.long()

    def reset_counters(self) -> None:
        self.loss_sum = torch.zeros(self.k, device=self.device, dtype=torch.float64)
        self.correct = torch.zeros(self.k, device=self.device, dtype=torch.long)
        self.seen = [0] * self.k
        self.active = [status == "running" for status in self.status]
        self.active_mask = torch.tensor(self.active, device=self.device, dtype=torch.float64)

    def train_epoch(self) -> list[dict]:
        self.reset_counters()
        self.model.train()
        lrs = [c.optim.lr for c in self.cfgs]
        every = self.cfgs[0].train.divergence_check_every
        for step, batches in enumerate(zip(*(b.epoch(self.epoch) for b in self.batches))):
            if not any(self.active):
                break
            t = max(e.t for e, a in zip(self.engines, self.active) if a)  # active runs advance together
            lrs = [lr_at(t, c.optim.lr, self.total_steps, self.steps_per_epoch, c.schedule) for c in self.cfgs]
            self.train_step([b[0] for b in batches], [b[1] for b in batches], lrs)
            if (step + 1) % every == 0:  # the unpacked run's check, at the same steps
                for i, engine in enumerate(self.engines):
                    if self.active[i] and not torch.isfinite(engine.w).all():
                        self.active[i] = False
                        self.active_mask[i] = 0.0
        seen = torch.tensor([max(n, 1) for n in self.seen], device=self.device, dtype=torch.float64)
        losses = (self.loss_sum / seen).tolist()
        accs = (self.correct.double() / seen).tolist()
        return [{"train_loss": losses[i], "train_acc": accs[i], "lr": lrs[i],
                 "diverged": not math.isfinite(losses[i]) or not bool(torch.isfinite(self.engines[i].w).all())}
                for i in range(self.k)]

    def evaluate(self) -> list[tuple[float, float]]:
        """(test loss, test accuracy) per run: one pass of the packed network over the test set."""
        self.use_current_weights()
        cfg = self.cfgs[0]
        if cfg.eval.bn == "recalibrate":
            plain = (torch.cat(xs, dim=1) for xs in zip(*(b.plain(cfg.eval.recal_batches) for b in self.batches)))
            with recalibrated_bn(self.model, plain, cfg.train.precision, self.device):
                sums = self._test_sums()
        else:
            sums = self._test_sums()
        n = max(float(sums[0, 2]), 1.0)
        return [(float(s[0]) / n, float(s[1]) / n) for s in sums]

    @torch.no_grad()
    def _test_sums(self) -> torch.Tensor:
        """[K, (loss sum, correct, count)]."""
        self.model.eval()
        sums = torch.zeros(self.k, 3, device=self.device, dtype=torch.float64)
        for x, y in self.batches[0].test(self.cfgs[0].eval.batch_size):
            with autocast(self.device, self.cfgs[0].train.precision):
                logits = self.model(x.repeat(1, self.k, 1, 1)).float()
            target = y[:, None].expand(-1, self.k)
            sums[:, 0] += F.cross_entropy(logits.permute(0, 2, 1), target, reduction="none").sum(0).double()
            sums[:, 1] += (logits.argmax(2) == target).sum(0).double()
            sums[:, 2] += len(y)
        self.model.train()
        return sums

    def fit(self, stop_after_epochs: int | None = None) -> list[dict] | None:
        """Train every run to the end (or stop early, resumably: returns None)."""
        shared = self.cfgs[0]
        while self.epoch < shared.train.epochs and "running" in self.status:
            if stop_after_epochs is not None and self.epoch >= stop_after_epochs:
                return None
            start = time.perf_counter()
            stats = self.train_epoch()
            evals = self.evaluate()
            self.epoch += 1
            epoch_s = time.perf_counter() - start
            self.wall_s += epoch_s
            for i in range(self.k):
                if self.status[i] != "running":
                    continue
                diverged = stats[i].pop("diverged")
                test_loss, test_acc = (math.nan, None) if diverged else evals[i]
                row = {"epoch": self.epoch, **stats[i], "test_loss": test_loss, "test_acc": test_acc,
                       "wall_s": round(epoch_s / self.k, 4), "elapsed_s": round(self.wall_s / self.k, 4),
                       "step": self.engines[i].t}
                self.histories[i].append(row)
                io.append_jsonl(self.outs[i] / METRICS, row)
                if diverged:
                    self.status[i] = "diverged"
                    self._finish(i)
                else:
                    io.save_torch(self.outs[i] / CHECKPOINT, self.run_state(i))
            self.log(f"[pack of {self.k}] epoch {self.epoch}/{shared.train.epochs} {epoch_s:.1f}s")
        results = []
        for i in range(self.k):
            if self.status[i] == "running":
                self.status[i] = "completed"
                self._finish(i)
            results.append(self.result(i))
        return results

    def _finish(self, i: int) -> None:
        # the model already holds the current weights: evaluate() put them there this epoch
        io.save_torch(self.outs[i] / WEIGHTS, cpu_state(self.model.run_state(i)))
        io.write_json(self.outs[i] / RESULT, self.result(i))
        _event(self.outs[i], "end", status=self.status[i], packed=self.k)
        io.remove(self.outs[i] / CHECKPOINT)

    def result(self, i: int) -> dict:
        extra = {"stage_map": self.stage_maps[i]} if self.stage_maps[i] else {}
        return result_record(self.cfgs[i], self.status[i], self.histories[i], self.engines[i].t,
                             self.wall_s / self.k, self.device, packed=self.k, **extra)


def train_pack(cfgs: list[RunConfig], out_dirs: list[Path], device: str = "auto",
               log: Callable[[str], None] = print, stop_after_epochs: int | None = None) -> list[dict] | None:
    """Train runs together; finished runs are skipped, all others must be at the same epoch."""
    todo = [(c, Path(o)) for c, o in zip(cfgs, out_dirs) if not (Path(o) / RESULT).exists()]
    if not todo:
        return [json.loads((Path(o) / RESULT).read_text()) for o in out_dirs]
    pack = PackedRun([c for c, _ in todo], [o for _, o in todo], device, log)
    for i, (cfg, out) in enumerate(todo):
        out.mkdir(parents=True, exist_ok=True)
        io.write_text(out / CONFIG, dump_yaml(cfg))
        if (out / CHECKPOINT).exists():
            pack.load_run_state(i, io.load_torch(out / CHECKPOINT, map_location="cpu"))
    epochs = {len(h) for h in pack.histories}
    if len(epochs) != 1:
        raise ValueError(f"runs of a pack are at different epochs {sorted(epochs)}")
    for i, (_, out) in enumerate(todo):
        io.write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in pack.histories[i]))
        _event(out, "start", from_epoch=pack.epoch, packed=pack.k)
    if pack.fit(stop_after_epochs) is None:
        return None
    return [json.loads((Path(o) / RESULT).read_text()) for o in out_dirs]
