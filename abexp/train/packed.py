"""Packing: K runs of one grid trained together in one process on one device.

A small ResNet at batch 128 leaves a GPU mostly idle; K runs as one network of grouped
convolutions (abexp.train.models.PackedCifarResNet) fill it. Each run keeps everything of its own:
seed (initial weights, data order, augmentation, delay draws), lr, momentum, rho, optimizer and
delay — each has its own DelayedSGD engine on a run-major copy of its weights. The runs whose
rule abexp.sim.batched covers (SGDM and AB at sampled delays) are then stepped together, as rows
of one vectorised update whose operation count does not grow with K; the others step their own
engine. What runs in a pack must share: the CIFAR model, the data, epochs, batch size,
precision and evaluation.

Each run's folder is written by the same lifecycle as a single run's (abexp.train.lifecycle: the
checkpoint format is the same, so a packed run can be resumed unpacked and vice versa, and
packed runs log to W&B like single ones); this module supplies only how a step serves K runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from abexp.config import RunConfig, run_id
from abexp.data.images import Batches
from abexp.train.trace_origin import replay_origin
from abexp.data.load import load_image_data
from abexp.sim.batched import BatchedSGD, covers, group_key
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.sim.optim import mitigations
from abexp.train.models import CIFAR_DEPTHS, PackedCifarResNet, build_model
from abexp.sim.pipeline import run_stages
from abexp.sim.schedule import lr_at
from abexp.train import lifecycle
from abexp.train.lifecycle import RESULT, Member
from abexp.train.run import (autocast, cpu_state, recalibrated_bn, resolve_device, result_record, set_determinism,
                             set_precision)

SHARED_KEYS = ("model", "data", "train", "eval")


def pack_key(cfg: RunConfig) -> str | None:
    """Runs with equal keys can share a pack; None: this run cannot be packed."""
    if (cfg.model.name not in CIFAR_DEPTHS or cfg.data.name == "imagenet" or cfg.train.micro_batches != 1
            or cfg.train.channels_last or cfg.train.compile or not cfg.delay.stashing
            or cfg.data.val_split  # a pack evaluates the test set only
            or mitigations(cfg.optim.name).muon  # Muon's engine needs each tensor's shape
            or replay_origin(cfg) is not None):  # a replay's batch order is Run's (replayed_batches)
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


def _own(state):
    """A checkpoint's tensors as their own copies: a row view would save its whole buffer."""
    if isinstance(state, dict):
        return {k: _own(v) for k, v in state.items()}
    return state.clone() if isinstance(state, torch.Tensor) else state


class PackedRun:
    def __init__(self, cfgs: list[RunConfig], out_dirs: list[Path], device: str = "auto",
                 log: Callable[[str], None] = print, vectorise: bool = True):
        """``vectorise=False`` steps every run's own engine in a loop (the reference the
        vectorised update is tested and measured against)."""
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
        sizes = [s // self.k for s in self.flat.sizes]
        w = self.flat.data[self.index].view(self.k, -1)
        staged = [run_stages(c, m, sizes, self.batches[0].input_shape) for c, m in zip(cfgs, singles)]
        self.stage_maps = [m for _, m in staged]
        self.engines = [DelayedSGD(w[i], sizes, c.optim, c.delay, c.seed, staged[i][0])
                        for i, c in enumerate(cfgs)]
        self.steps_per_epoch = self.batches[0].steps_per_epoch
        self.total_steps = self.steps_per_epoch * shared.train.epochs
        # rows: the vectorised runs first (grouped by what their rule needs), then the others
        together = [i for i in range(self.k) if vectorise and covers(self.engines[i], cfgs[i].optim)]
        together.sort(key=lambda i: group_key(cfgs[i].optim))  # stable: run order within a group
        self.order = together + [i for i in range(self.k) if i not in together]
        self.n_together = len(together)
        numel = len(self.index) // self.k
        rows = self.index.view(self.k, numel)[torch.tensor(self.order, device=self.index.device)].reshape(-1)
        self.grad_index = rows  # flat.grad[grad_index]: the gradients in row order
        self.fwd_index = torch.empty_like(rows)  # fwd.view(-1)[fwd_index]: row order -> flat order
        self.fwd_index[rows] = torch.arange(len(rows), device=rows.device)
        self.fwd = torch.empty(self.k, numel, device=self.device, dtype=self.flat.data.dtype)  # row order
        self.grads = torch.empty_like(self.fwd)
        self.fwd_flat, self.grads_flat = self.fwd.view(-1), self.grads.view(-1)  # kept: no view per step
        self.together = None
        if together:
            def lr_fn(t: int) -> list[float]:
                return [lr_at(t, cfgs[i].optim.lr, self.total_steps, self.steps_per_epoch, cfgs[i].schedule)
                        for i in together]
            n = self.n_together
            self.together = BatchedSGD([self.engines[i] for i in together], [cfgs[i].optim for i in together],
                                       sizes, lr_fn, self.fwd[:n], self.grads[:n])
        self.epoch, self.wall_s = 0, 0.0
        self.members = [Member(c, o, rid) for c, o, rid in zip(cfgs, self.outs, self.ids)]
        self.is_main = True
        self.reset_counters()

    @property
    def histories(self) -> list[list[dict]]:
        return [m.history for m in self.members]

    @property
    def status(self) -> list[str]:
        return [m.status for m in self.members]

    # ---------------------------------------------------------------- state (per run, Run's format)
    def checkpoint(self, i: int) -> dict:
        buffers = self.model.run_state(i, buffers_only=True)
        return {"epoch": self.epoch, "device": self.device.type, "engine": _own(self.engines[i].state_dict()), "buffers": buffers,
                "rng": {"torch": torch.get_rng_state()}, "history": self.histories[i],
                "wall_s": self.wall_s, "run_id": self.ids[i]}

    def restore(self, i: int, state: dict) -> None:
        if state.get("run_id") != self.ids[i]:
            raise lifecycle.RunDirError(f"{self.outs[i] / lifecycle.CHECKPOINT}: belongs to run {state.get('run_id')}")
        self.engines[i].load_state_dict(state["engine"])
        self.members[i].history = list(state["history"])
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            target = buffers[name]
            if name.endswith("num_batches_tracked"):
                target.copy_(value)
            else:
                target.chunk(self.k, dim=0)[i].copy_(value)
        self.epoch, self.wall_s = int(state["epoch"]), float(state["wall_s"])

    def use_current_weights(self) -> None:
        torch.stack([self.engines[i].w for i in self.order], out=self.fwd)
        torch.index_select(self.fwd_flat, 0, self.fwd_index, out=self.flat.data)

    # ---------------------------------------------------------------- training
    def train_step(self, xs: list[torch.Tensor], ys: list[torch.Tensor], lrs: list[float]) -> None:
        n = self.n_together
        if self.together is not None:
            self.together.begin([lrs[i] for i in self.order[:n]])
        begun = {i: self.engines[i].begin(lrs[i]) for i in self.order[n:]}  # the runs it does not cover
        if begun:
            torch.stack([begun[i][1] for i in self.order[n:]], out=self.fwd[n:])
        torch.index_select(self.fwd_flat, 0, self.fwd_index, out=self.flat.data)
        self.flat.grad.zero_()
        x = torch.stack(xs, dim=1).flatten(1, 2)
        y = torch.stack(ys, dim=1)
        with autocast(self.device, self.cfgs[0].train.precision):
            logits = self.model(x).float()
        losses = F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none",
                                 label_smoothing=self.cfgs[0].train.label_smoothing).mean(0)
        losses.sum().backward()  # runs are independent: d(sum)/d(run k) = run k's gradient
        torch.index_select(self.flat.grad, 0, self.grad_index, out=self.grads_flat)
        if self.together is not None:
            self.together.finish()  # its inactive rows stay as they are
        for row in range(n, self.k):
            i = self.order[row]
            if self.active[i]:  # a run that diverged mid-epoch stops where an unpacked run would
                tau, w_fwd = begun[i]
                self.engines[i].finish(self.grads[row], w_fwd, tau, lrs[i])
        for i in range(self.k):
            if self.active[i]:
                self.seen[i] += len(y)
        self.loss_sum += losses.detach().double() * len(y) * self.active_mask
        self.correct += (logits.argmax(2) == y).sum(0) * self.active_mask.long()

    def reset_counters(self) -> None:
        self.loss_sum = torch.zeros(self.k, device=self.device, dtype=torch.float64)
        self.correct = torch.zeros(self.k, device=self.device, dtype=torch.long)
        self.seen = [0] * self.k
        self.active = [status == "running" for status in self.status]
        self.active_mask = torch.ones(self.k, device=self.device, dtype=torch.float64)  # no host copy
        for i, active in enumerate(self.active):
            if not active:
                self.active_mask[i].fill_(0.0)  # a kernel with a scalar argument: no copy
        self._share_active()

    def _share_active(self) -> None:
        if self.together is not None:
            self.together.set_active([self.active[i] for i in self.order[:self.n_together]])

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
                        self._share_active()
        seen = [max(n, 1) for n in self.seen]  # divided on the host: the same float64 division, no copy
        losses = [s / n for s, n in zip(self.loss_sum.tolist(), seen)]
        accs = [c / n for c, n in zip(self.correct.double().tolist(), seen)]
        return [{"train_loss": losses[i], "train_acc": accs[i], "lr": lrs[i],
                 "diverged": not math.isfinite(losses[i]) or not bool(torch.isfinite(self.engines[i].w).all())}
                for i in range(self.k)]

    def evaluate(self, bn: str | None = None) -> list[tuple[float, float]]:
        """(test loss, test accuracy) per run: one pass of the packed network over the test set.
        ``bn`` overrides eval.bn (the last epoch of a recalibrated pack also reports the other)."""
        self.use_current_weights()
        cfg = self.cfgs[0]
        if (bn or cfg.eval.bn) == "recalibrate":
            plain = (torch.cat(xs, dim=1) for xs in zip(*(b.plain(cfg.eval.recal_batches) for b in self.batches)))
            with recalibrated_bn(self.model, plain, cfg.train.precision, self.device):
                sums = self._test_sums()
        else:
            sums = self._test_sums()
        rows = sums.tolist()  # one host read
        n = max(rows[0][2], 1.0)
        return [(loss_sum / n, correct / n) for loss_sum, correct, _ in rows]

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

    # ---------------------------------------------------------------- what the lifecycle asks
    def weights(self, i: int) -> dict[str, torch.Tensor]:
        self.use_current_weights()
        return cpu_state(self.model.run_state(i))

    def steps(self, i: int) -> int:
        return self.engines[i].t

    def event_fields(self, end: bool = False) -> dict:
        return {"packed": self.k}

    def barrier(self) -> None:
        pass

    def result(self, i: int) -> dict:
        extra = {"stage_map": self.stage_maps[i]} if self.stage_maps[i] else {}
        return result_record(self.cfgs[i], self.status[i], self.histories[i], self.engines[i].t,
                             self.wall_s / self.k, self.device, packed=self.k, **extra)


def train_pack(cfgs: list[RunConfig], out_dirs: list[Path], device: str = "auto",
               log: Callable[[str], None] = print, stop_after_epochs: int | None = None) -> list[dict] | None:
    """Train runs together; finished runs are skipped, all others must be at the same epoch."""
    todo = [(c, Path(o)) for c, o in zip(cfgs, out_dirs) if lifecycle.finished_result(Path(o), c) is None]
    if todo:
        pack = PackedRun([c for c, _ in todo], [o for _, o in todo], device, log)
        if lifecycle.train(pack, stop_after_epochs, None, log) is None:
            return None
    return [json.loads((Path(o) / RESULT).read_text()) for o in out_dirs]
