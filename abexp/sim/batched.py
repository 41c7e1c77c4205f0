"""One vectorised delayed update for many packed runs: their weights, velocities and
forward-weight rings as rows of shared buffers, updated by a number of tensor operations that
does not depend on how many runs there are.

Why: a pack of K runs (abexp.train.packed) stepped K ``DelayedSGD`` engines in a Python loop,
about 30 ATen operations per run per step (51 for an AB run): at K = 32 three quarters of a
step's operations, each a kernel launch on a GPU. Here the runs' state is adopted into
[n, P] buffers (the engines keep their objects, whose tensors become row views, so their
``state_dict`` is still a single run's checkpoint), and one step is:

- the ring: every run's ring of its own depth D_i + 1 lies in one [sum(D_i + 1), P] buffer;
  one ``index_copy_`` stores all runs' forward weights, one ``index_select`` reads all stale
  ones. The slot indices (and the per-run learning rates) are pure functions of the step, so
  they are computed on the host for ``CHUNK`` steps at a time and copied to the device once
  per chunk, without blocking (pinned memory): no host-to-device copy per step.
- the update: rows are ordered by what the rule needs (AB's brake or not, Nesterov, weight
  decay on current/stale weights or none); each such group is one contiguous slice and one
  batched update with per-run lr, momentum, weight decay and rho as [rows, 1] tensors.

Results are bitwise those of the per-run engines (tests/test_batched.py): every operation is
element-wise except AB's per-tensor sums, whose rows are summed independently of the batch
(abexp.sim.segments), and ``addcmul_`` with a [rows, 1] factor rounds as ``add_`` with a scalar
``alpha`` does (both a fused multiply-add on the CPU; to be checked on CUDA, tests/test_gpu.py).

Covered (``covers``): optimizers ``sgdm`` and ``ab`` (AB with per-tensor cosines, or rho 0),
any momentum, Nesterov, weight decay, and the delay kinds with a sampler (constant, uniform,
geometric, trace). Everything else keeps its own DelayedSGD in the pack: pipeline delays
(per-stage slices), the other mitigations, the Adam family, AB's global cosine (a whole-vector
sum whose order depends on the thread split, so not bitwise as a row sum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from abexp.config import OptimCfg
from abexp.sim.engine import DelayedSGD
from abexp.sim.optim import segment_cosine
from abexp.sim.segments import Segments

BATCHED_OPTIMIZERS = ("sgdm", "ab")
CHUNK = 256  # steps of slot indices and learning rates computed and copied to the device at once


def brakes(optim: OptimCfg) -> bool:
    return optim.name == "ab" and bool(optim.rho)


def covers(engine: DelayedSGD, optim: OptimCfg) -> bool:
    """Whether this run's step can be one row of the vectorised update (else: its own engine)."""
    return (optim.name in BATCHED_OPTIMIZERS and engine.sampler is not None and engine.stage_delays is None
            and engine.backward_delays is None and not (brakes(optim) and optim.ab_cosine != "tensor"))


def group_key(optim: OptimCfg) -> tuple:
    """Runs with equal keys need the same operations: one contiguous slice, one update."""
    decay = "none" if not optim.weight_decay else optim.weight_decay_on
    return (brakes(optim), optim.nesterov, decay)


@dataclass
class _Slice:
    """A contiguous range of active rows with one group key, and its views."""
    a: int
    b: int
    brake: bool
    nesterov: bool
    decay: str
    w: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    fwd: torch.Tensor
    m: torch.Tensor
    wd: torch.Tensor
    rho: torch.Tensor
    brake_sums: torch.Tensor
    scratch: torch.Tensor | None


class BatchedSGD:
    """The delayed SGDM/AB steps of ``engines`` (ordered by ``group_key``) as one update.

    ``fwd`` and ``grad`` are [n, P] buffers owned by the caller: ``begin`` writes each run's
    forward weights into ``fwd``; ``finish`` applies the gradients found in ``grad`` (consumed).
    ``lr_fn(t)`` gives the runs' learning rates at step t (row order) as the caller's schedule
    does; a step given other rates copies them to the device (kept while they stay the same).
    """

    def __init__(self, engines: list[DelayedSGD], optims: list[OptimCfg], segment_sizes: list[int],
                 lr_fn: Callable[[int], list[float]], fwd: torch.Tensor, grad: torch.Tensor):
        if not all(covers(e, o) for e, o in zip(engines, optims)):
            raise ValueError("BatchedSGD takes only the runs that covers() accepts")
        keys = [group_key(o) for o in optims]  # rows with equal keys next to each other: one slice
        first = engines[0].w
        n, numel, device, dtype = len(engines), first.numel(), first.device, first.dtype
        self.engines, self.optims, self.keys, self.lr_fn = engines, optims, keys, lr_fn
        self.fwd, self.grad = fwd, grad
        self.w = torch.stack([e.w for e in engines])
        self.v = torch.stack([e.optimizer.v for e in engines])
        depths = [e.history.slots for e in engines]
        self.bases = [sum(depths[:j]) for j in range(n)]
        self.ring = torch.cat([e.history.buffer for e in engines])
        self.brake_sums = torch.zeros(n, 2, device=device, dtype=torch.float64)
        for j, e in enumerate(engines):  # adopt: each engine's tensors become views of its row
            e.w = self.w[j]
            e.optimizer.v = self.v[j]
            e.history.buffer = self.ring[self.bases[j]:self.bases[j] + depths[j]]
            if e.optimizer.brake_log is not None:
                self.brake_sums[j].copy_(e.optimizer.brake_log.sums)
                e.optimizer.brake_log.sums = self.brake_sums[j]
        column = lambda xs: torch.tensor(xs, device=device, dtype=dtype).view(n, 1)  # noqa: E731
        self.m = column([o.momentum for o in optims])
        self.wd = column([o.weight_decay for o in optims])
        self.rho = column([o.rho for o in optims])
        self.segments = Segments(segment_sizes, device) if any(k[0] for k in keys) else None
        self.n_segments = len(segment_sizes)
        self._chunk_start, self._tables, self._host_lrs = -1, None, []
        self._given: tuple[list[float], torch.Tensor] | None = None
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}
        self.set_active([True] * n)
        t = self._step_t()
        self._build(t - t % CHUNK)  # now, not inside the first epoch

    def set_active(self, active: list[bool]) -> None:
        """Rows that take updates (a diverged or pruned run stops where it would alone)."""
        self.active = list(active)
        self.slices: list[_Slice] = []
        a = 0
        while a < len(self.engines):
            if not self.active[a]:
                a += 1
                continue
            b = a + 1
            while b < len(self.engines) and self.active[b] and self.keys[b] == self.keys[a]:
                b += 1
            brake, nesterov, decay = self.keys[a]
            scratch = None
            if brake:  # kept: a fresh [3, rows, P] buffer per step costs its page faults
                if (a, b) not in self._scratch:
                    self._scratch[(a, b)] = torch.empty((3, b - a, self.w.shape[1]), device=self.w.device,
                                                        dtype=self.w.dtype)
                scratch = self._scratch[(a, b)]
            self.slices.append(_Slice(a, b, brake, nesterov, decay, self.w[a:b], self.v[a:b], self.grad[a:b],
                                      self.fwd[a:b], self.m[a:b], self.wd[a:b], self.rho[a:b],
                                      self.brake_sums[a:b], scratch))
            a = b

    def _step_t(self) -> int:
        live = [e.t for e, on in zip(self.engines, self.active) if on] or [max(e.t for e in self.engines)]
        if min(live) != max(live):
            raise RuntimeError(f"packed runs at different steps {sorted(set(live))}: cannot update them together")
        return live[0]

    def _build(self, start: int) -> None:
        """Slot indices and -lr for steps start .. start + CHUNK - 1, one copy to the device."""
        store, stale, lrs = [], [], []
        for t in range(start, start + CHUNK):
            taus = [e.delays(t)[0] for e in self.engines]
            store.append([base + t % e.history.slots for base, e in zip(self.bases, self.engines)])
            stale.append([base + max(t - tau, 0) % e.history.slots
                          for base, e, tau in zip(self.bases, self.engines, taus)])
            lrs.append([float(lr) for lr in self.lr_fn(t)])
        index = self._to_device(np.asarray([a + b for a, b in zip(store, stale)], dtype=np.int64))
        neg_lr = self._to_device(-np.asarray(lrs, dtype=np.float64))  # -lr rounds as alpha=-lr does
        self._chunk_start, self._tables, self._host_lrs = start, (index, neg_lr), lrs

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        """Host values on the device without making the host wait: a numpy-backed tensor (no
        copy on a CPU), or a non-blocking copy from pinned memory (which the caching host
        allocator keeps until the copy is done)."""
        host = torch.from_numpy(np.ascontiguousarray(values))
        if host.is_floating_point():
            host = host.to(self.w.dtype)
        if self.w.device.type == "cpu":
            return host
        return host.pin_memory().to(self.w.device, non_blocking=True)

    def begin(self, lrs: list[float]) -> None:
        """Store every run's forward weights of this step, read the stale ones into ``fwd``."""
        t = self._step_t()
        start = t - t % CHUNK
        if start != self._chunk_start:
            self._build(start)
        index, neg_lr = self._tables
        row, n = t - start, len(self.engines)
        lrs = [float(lr) for lr in lrs]
        if lrs == self._host_lrs[row]:
            self.neg_lr = neg_lr[row].view(n, 1)
        else:  # rates other than the schedule's (a caller's own): copied once while unchanged
            if self._given is None or self._given[0] != lrs:
                self._given = (lrs, self._to_device(-np.asarray(lrs, dtype=np.float64)).view(n, 1))
            self.neg_lr = self._given[1]
        slots = index[row]
        self.ring.index_copy_(0, slots[:n], self.w)
        torch.index_select(self.ring, 0, slots[n:], out=self.fwd)

    def finish(self) -> None:
        """Apply ``grad`` (computed at ``fwd``) to the active rows, as DelayedSGD.finish would."""
        for s in self.slices:
            g, neg_lr = s.g, self.neg_lr[s.a:s.b]
            if s.decay != "none":  # g += wd * (w | w_fwd)
                g.addcmul_(s.w if s.decay == "current" else s.fwd, s.wd)
            if s.brake:  # g *= 1 - rho cos(g, v), per tensor
                scale = 1.0 - s.rho * segment_cosine(g, s.v, self.segments, s.scratch)
                d = scale.detach().double()
                s.brake_sums.add_(torch.stack([d.sum(1), (d * d).sum(1)], dim=1))
                self.segments.scale_(g, scale)
            s.v.mul_(s.m).add_(g)
            if s.nesterov:
                s.w.addcmul_(g.addcmul_(s.v, s.m), neg_lr)
            else:
                s.w.addcmul_(s.v, neg_lr)
            for e in self.engines[s.a:s.b]:
                if s.brake:
                    e.optimizer.brake_log.count += self.n_segments
                e.optimizer.steps += 1
                e.t += 1
