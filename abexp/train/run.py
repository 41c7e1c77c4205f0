"""One training run under simulated gradient delay: the unit every experiment is made of.

``Run`` is the trainer of one run: model, data, delay engine and how a step is taken (with
micro-batches, DDP ranks, precision and compilation). Its folder and its life from start to
result are ``abexp.train.lifecycle``'s, shared with packed runs.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from abexp.train import lifecycle, preempt
from abexp.config import RunConfig, check_processes, run_id
from abexp.process_env import init_process_env
from abexp.train.distributed import Dist, init_from_env
from abexp.data.images import Batches
from abexp.data.common import has_validation
from abexp.data.load import load_image_data
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.sim.optim import mitigations
from abexp.train import catalog
from abexp.train.backward_weights import backward_weights
from abexp.sim.schedule import lr_at
from abexp.train.lifecycle import (CHECKPOINT, CONFIG, EVENTS, METRICS, RESULT, WEIGHTS, Member,  # noqa: F401
                                   RunDirError)
from abexp.train.trace_origin import replay_origin
from abexp.train.tracking import Tracker


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(name)


def set_determinism(on: bool, device: torch.device) -> None:
    """train.deterministic on CUDA: deterministic cuDNN and cuBLAS algorithms, an error for any
    op that has none; off: cuDNN may pick (benchmark) its fastest algorithms. CPU kernels are
    deterministic already and are left alone."""
    if device.type != "cuda":
        return
    # cuBLAS reads it once, at the process's first matmul: every entry point sets it at its start
    # (abexp.process_env); this call only covers a Run built by a library user before any matmul
    init_process_env()
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on
    torch.use_deterministic_algorithms(on)


def restore_rng(rng: dict, device: torch.device) -> None:
    """Restore saved RNG states, whatever device the checkpoint's tensors were mapped to
    (torch.set_rng_state takes CPU byte tensors only). A CUDA state saved as a list (one per
    GPU of the node, older checkpoints) gives this device's entry, or the first."""
    torch.set_rng_state(rng["torch"].cpu())
    cuda = rng.get("cuda")
    if cuda is None or device.type != "cuda" or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda.cpu(), device)


def set_precision(precision: str) -> None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_data(cfg: RunConfig, device: torch.device, ddp: Dist = Dist()):
    """Batches for the run: in-memory (images or tensors) or ImageNet's DataLoader."""
    from abexp.registry import DATASETS
    if DATASETS.get(cfg.data.name).input_kind == "image_folder":
        from abexp.data.imagenet import ImageNetBatches
        return ImageNetBatches(cfg, device, ddp.rank, ddp.world)
    data = load_image_data(cfg, device)
    return Batches(data, cfg.train.batch_size, cfg.data.augment, cfg.seed)


def batch_gradient(trainer, chunks: list[tuple[torch.Tensor, torch.Tensor]], w_fwd: torch.Tensor,
                   w_bwd: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The mean gradient of a batch's micro-batches at ``w_fwd``, into ``trainer.flat.grad``:
    one function for the simulator and the async workers, so the two are bitwise comparable.
    With ``w_bwd`` (an unstashed pipeline) the backward pass uses those weights instead.
    Returns per micro-batch (loss x examples as float64, correct count), on the device."""
    cfg, flat = trainer.cfg, trainer.flat
    micro = len(chunks)
    flat.data.copy_(w_fwd)
    flat.grad.zero_()
    sums = []
    for xm, ym in chunks:
        xm = xm.contiguous(memory_format=trainer.memory_format)
        swap = backward_weights(flat.data, w_bwd) if w_bwd is not None else contextlib.nullcontext()
        with autocast(trainer.device, cfg.train.precision), swap:
            logits = trainer.train_model(xm)
            loss = F.cross_entropy(logits.float(), ym, label_smoothing=cfg.train.label_smoothing)
        (loss / micro if micro > 1 else loss).backward()
        # numel: a label per example, or per token (a language model's [B, T] targets)
        sums.append((loss.detach().double() * ym.numel(), (logits.argmax(1) == ym).sum()))
    return sums


@torch.no_grad()
def evaluate(model: nn.Module, test_batches: Iterator, device: torch.device, precision: str
             ) -> torch.Tensor:
    """[loss sum, correct, count] over the batches (summed over ranks by the caller), on the
    device: nothing is copied to or read from the host (the count is a fill, not a copy)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in test_batches:
        with autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        n += y.numel()  # examples, or tokens for a language model
    model.train()
    return torch.stack([loss_sum, correct.double(), torch.full((), float(n), device=device, dtype=torch.float64)])


@contextlib.contextmanager
def recalibrated_bn(model: nn.Module, images: Iterator[torch.Tensor], precision: str,
                    device: torch.device):
    """Recompute BN running statistics at the current weights; restore the originals after.

    Under delay the running statistics were gathered on stale forward passes; docs/science.md §1
    shows evaluating with them loses accuracy that recomputing them recovers. The training
    state is left untouched.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
              m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    with torch.no_grad():
        for x in images:
            with autocast(device, precision):
                model(x)
    try:
        yield
    finally:
        for m, (mean, var, count, momentum) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum


class Run:
    """Model, data, delay engine and bookkeeping of one run; ``fit`` trains it to the end."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, device: str = "auto",
                 log: Callable[[str], None] = print):
        self.cfg, self.out, self.log = cfg, Path(out_dir), log
        self.run_id = run_id(cfg)
        # a replay of an async run: its device and torch threads (train_run restores the threads)
        self.origin = replay_origin(cfg)
        if self.origin is not None:
            device = self.origin.device_for(device, cfg.delay.trace)
            torch.set_num_threads(self.origin.threads)
        self.device = resolve_device(device)
        # an async run's processes (torchrun/srun may have started them) are a server and its
        # workers, not data-parallel ranks
        self.ddp = Dist() if cfg.delay.kind == "async" else init_from_env(self.device.type)
        if self.ddp.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.ddp.local_rank)
            torch.cuda.set_device(self.device)
        # the CLI checks this against the file first; here for a WORLD_SIZE set by hand
        check_processes(cfg, self.ddp.world, f"run {self.run_id} (WORLD_SIZE={self.ddp.world})")
        set_precision(cfg.train.precision)
        set_determinism(cfg.train.deterministic, self.device)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.batches = build_data(cfg, self.device, self.ddp)
        self.model = catalog.build(cfg, self.batches.num_classes, self.batches.input_shape,
                                   self.batches.channels).to(self.device)
        self.flat = FlatParams(self.model, cfg.train.channels_last)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        # the compiled module reads the same parameter views, so weight swaps stay plain copies
        self.train_model = torch.compile(self.model) if cfg.train.compile else self.model
        ranges, self.stage_map = catalog.stages(cfg, self.model, self.flat.sizes, self.batches.input_shape)
        matrices = None  # the muon rules: which tensors Muon updates, as matrices (abexp.sim.muon)
        if mitigations(cfg.optim.name).muon:
            from abexp.sim.muon import muon_matrices
            matrices = muon_matrices(self.model, cfg.optim.muon_params)
        self.engine = DelayedSGD(self.flat.data, self.flat.sizes, cfg.optim, cfg.delay, cfg.seed, ranges,
                                 matrices)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.replay = replayed_batches(cfg, self.total_steps, self.batches)
        self.members = [Member(cfg, self.out, self.run_id)]
        self.is_main = self.ddp.is_main
        self.epoch, self.wall_s = 0, 0.0
        self.step_in_epoch = 0  # > 0 only in a checkpoint saved mid-epoch on a signal
        self.reset_counters()
        self.stop_flag = torch.zeros((), device=self.device)  # DDP: the ranks' stop vote
        self.rank_counters: torch.Tensor | None = None  # DDP, stopped mid-epoch: every rank's sums

    @property
    def history(self) -> list[dict]:
        return self.members[0].history

    @property
    def status(self) -> str:
        return self.members[0].status

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this run's GPU only: a resume may see other GPUs
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"epoch": self.epoch, "device": self.device.type, "engine": self.engine.state_dict(),
                "buffers": dict(self.model.named_buffers()), "rng": rng,
                "history": self.history, "wall_s": self.wall_s, "run_id": self.run_id,
                "step_in_epoch": self.step_in_epoch,
                "epoch_counters": {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                                   "ranks": self.rank_counters}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("run_id") != self.run_id:
            raise RunDirError(f"{self.out / CHECKPOINT}: belongs to run {state.get('run_id')}")
        saved_on = state.get("device")  # absent in checkpoints older than this check
        if saved_on is not None and saved_on != self.device.type:
            # the data order comes from per-device generators: the rest of the run would differ
            raise RunDirError(f"{self.out / CHECKPOINT}: this run started on {saved_on} and cannot resume "
                              f"on {self.device.type} (resume it on {saved_on}, or delete the checkpoint "
                              "to restart it here)")
        self.epoch, self.wall_s = int(state["epoch"]), float(state["wall_s"])
        self.members[0].history = list(state["history"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        if self.step_in_epoch:  # the interrupted epoch's running loss and accuracy sums
            counters, ranks = state["epoch_counters"], state["epoch_counters"].get("ranks")
            if ranks is not None and len(ranks) == self.ddp.world:  # DDP: each rank its own sums
                row = ranks[self.ddp.rank]
            elif self.ddp.is_main:
                row = torch.stack([torch.as_tensor(counters[k], dtype=torch.float64).cpu()
                                   for k in ("loss_sum", "correct", "seen")])
            else:  # another world size: rank 0's sums, counted once
                row = torch.zeros(3, dtype=torch.float64)
            self.loss_sum.copy_(row[0])
            self.correct.copy_(row[1])
            self.seen = int(row[2])
        self.engine.load_state_dict(state["engine"])
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)
        restore_rng(state["rng"], self.device)

    def use_current_weights(self) -> None:
        self.flat.data.copy_(self.engine.w)

    # ---------------------------------------------------------------- training
    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """One delayed update; loss and correct counts accumulate on the device (no sync).

        ``x`` is the global batch, or this rank's share when the data is sharded already.
        The gradient is the mean over micro-batches and ranks, all-reduced before the engine.
        """
        cfg, ddp = self.cfg, self.ddp
        if ddp.enabled and not getattr(self.batches, "sharded", False):
            share = len(y) // ddp.world
            x, y = x[ddp.rank * share:(ddp.rank + 1) * share], y[ddp.rank * share:(ddp.rank + 1) * share]
        chunks = list(zip(x.chunk(cfg.train.micro_batches), y.chunk(cfg.train.micro_batches)))
        self.seen += y.numel()  # examples, or tokens: the running loss is per character

        def grad_fn(w_fwd: torch.Tensor) -> torch.Tensor:
            with self.origin.gradient_threads() if self.origin else contextlib.nullcontext():
                sums = batch_gradient(self, chunks, w_fwd, self.engine.w_bwd)
            for loss_sum, correct in sums:
                self.loss_sum += loss_sum
                self.correct += correct
            return ddp.all_reduce_mean_(self.flat.grad)

        self.engine.step(grad_fn, lr)

    def stop_requested(self, check: bool = True) -> bool:
        """A stop signal, as every rank will act on it: alone, as soon as it is heard; under
        DDP only where ``check`` (every train.divergence_check_every steps, and between epochs),
        agreed by an all-reduce of the ranks' flags, so all stop after the same step without
        a host sync on the others (each rank may hear the signal at another step)."""
        if not self.ddp.enabled:
            return preempt.requested() is not None
        if not check:
            return False
        self.stop_flag.fill_(preempt.requested() is not None)
        return bool(self.ddp.all_reduce_max_(self.stop_flag))

    def counters(self) -> torch.Tensor:
        """The epoch's running sums so far: [loss sum, correct, seen] (this rank's)."""
        return torch.stack([self.loss_sum, self.correct.double(),
                            torch.full((), float(self.seen), device=self.device, dtype=torch.float64)])

    def reset_counters(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

    def train_epoch(self) -> list[dict]:
        """One epoch, or its rest after a mid-epoch checkpoint. Raises ``Preempted`` after the
        step during which a stop signal arrived (the caller saves the checkpoint)."""
        cfg = self.cfg
        start, self.step_in_epoch = self.step_in_epoch, 0
        if start == 0:
            self.reset_counters()
        lr = cfg.optim.lr
        self.model.train()
        batches = self.batches.epoch(self.epoch) if self.replay is None else self.replay.epoch(self.epoch)
        first = 0
        if start and self.replay is None and hasattr(self.batches, "epoch_from"):
            batches, first = self.batches.epoch_from(self.epoch, start), start  # ImageNet: not even loaded
        for i, (x, y) in enumerate(batches, first):
            if i < start:  # drawn and dropped: the data order and augmentation stay seeded
                continue
            lr = lr_at(self.engine.t, cfg.optim.lr, self.total_steps, self.steps_per_epoch, cfg.schedule)
            self.train_step(x, y, lr)
            # the weights are identical on every rank, so every rank takes the same decision
            check = (i + 1) % cfg.train.divergence_check_every == 0
            if check and not torch.isfinite(self.engine.w).all():
                break
            if i + 1 < self.steps_per_epoch and self.stop_requested(check):
                self.step_in_epoch = i + 1
                self.rank_counters = self.ddp.all_gather(self.counters()) if self.ddp.enabled else None
                raise preempt.Preempted(f"epoch {self.epoch + 1} step {i + 1}")
        totals = self.ddp.all_reduce_sum_(torch.stack([
            self.loss_sum, self.correct.double(),
            torch.full((), float(self.seen), device=self.device, dtype=torch.float64)]))
        for buf in self.model.buffers():  # BN statistics: rank 0's, everywhere
            self.ddp.broadcast_(buf)
        # the epoch's one host read: its sums and whether the weights are finite
        loss_sum, correct, seen, finite = torch.cat([
            totals, torch.isfinite(self.engine.w).all().double().unsqueeze(0)]).tolist()
        seen = max(seen, 1.0)
        train_loss = loss_sum / seen
        return [{"train_loss": train_loss, "train_acc": correct / seen, "lr": lr,
                 "diverged": not math.isfinite(train_loss) or not finite}]

    def evaluate(self, bn: str | None = None, split: str = "test") -> list[tuple[float, float]]:
        """[(test loss, test accuracy)] at the current weights; ranks add their shares. ``bn``
        overrides eval.bn (the last epoch of a recalibrated run also reports the other);
        ``split="val"``: the same on the examples data.val_split held out of training."""
        self.use_current_weights()
        fmt = self.memory_format
        test = ((x.contiguous(memory_format=fmt), y) for x, y in self.batches.test(self.cfg.eval.batch_size, split))
        if (bn or self.cfg.eval.bn) == "recalibrate":
            plain = (x.contiguous(memory_format=fmt) for x in self.batches.plain(self.cfg.eval.recal_batches))
            with recalibrated_bn(self.model, plain,
                                 self.cfg.train.precision, self.device):
                sums = evaluate(self.model, test, self.device, self.cfg.train.precision)
        else:
            sums = evaluate(self.model, test, self.device, self.cfg.train.precision)
        if getattr(self.batches, "sharded", False):
            self.ddp.all_reduce_sum_(sums)
        loss_sum, correct, n = sums.tolist()  # one host read
        n = max(n, 1.0)
        return [(loss_sum / n, correct / n)]

    def fit(self, stop_after_epochs: int | None = None, tracker: Tracker | None = None,
            on_epoch: Callable[[dict], bool] | None = None) -> dict | None:
        """Train to the configured number of epochs with the shared loop (abexp.train.lifecycle),
        or stop early (None, resumable). ``on_epoch(row)`` True prunes the run."""
        self.members[0].tracker = tracker
        prune = (lambda i, row: on_epoch(row)) if on_epoch is not None else None
        if not lifecycle.fit(self, stop_after_epochs, prune, self.log):
            return None
        return self.members[0].result

    # ---------------------------------------------------------------- what the lifecycle asks
    def checkpoint(self, i: int) -> dict:
        return self.state_dict()

    def restore(self, i: int, state: dict) -> None:
        self.load_state_dict(state)

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        self.use_current_weights()
        return cpu_state(self.model.state_dict())

    def steps(self, i: int) -> int:
        return self.engine.t

    def event_fields(self, end: bool = False) -> dict:
        return {} if end else {"processes": self.ddp.world}

    def barrier(self) -> None:
        self.ddp.barrier()

    def result(self, i: int = 0) -> dict:
        extra = {"stage_map": self.stage_map} if self.stage_map else {}
        return result_record(self.cfg, self.status, self.history, self.engine.t, self.wall_s,
                             self.device, processes=self.ddp.world, **extra)


class ReplayedOrder:
    """An async run's batch order (trace.txt's second column): update t trains on batch j(t)."""

    def __init__(self, order: list[int], batches):
        from abexp.data.stream import BatchStream
        self.order, self.stream = order, BatchStream(batches, batches.steps_per_epoch)
        self.steps = batches.steps_per_epoch

    def epoch(self, epoch: int):
        """The batches of ``epoch``'s updates (from its first: a resumed epoch skips as usual)."""
        for u in range(epoch * self.steps, (epoch + 1) * self.steps):
            yield self.stream.get(self.order[u])


def replayed_batches(cfg: RunConfig, total_steps: int, batches) -> ReplayedOrder | None:
    """A trace that gives each update's batch is replayed in that order; it must cover the run."""
    if cfg.delay.kind != "trace" or not cfg.delay.trace:
        return None
    from abexp.config import ConfigError, read_trace_columns
    delays, order = read_trace_columns(cfg.delay.trace, cfg.delay.steps)
    if order is None:
        return None
    if len(order) < total_steps or sorted(order[:total_steps]) != list(range(total_steps)):
        raise ConfigError(cfg.delay.trace, "delay.trace", f"its batch column must name each of the run's "
                          f"{total_steps} batches once (it has {len(order)} lines): the trace of another run?")
    return ReplayedOrder(order, batches)


def result_record(cfg: RunConfig, status: str, history: list[dict], steps: int, wall_s: float,
                  device: torch.device, **extra) -> dict:
    """result.json's content, from the per-epoch rows (shared by plain and packed runs)."""
    accs = [r["test_acc"] for r in history if r["test_acc"] is not None]
    last = history[-1] if history else {}
    val = {}
    if has_validation(cfg):  # only then: a result.json without a validation set is as before
        val_accs = [r["val_acc"] for r in history if r.get("val_acc") is not None]
        val = {"val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"),
               "best_val_acc": max(val_accs) if val_accs else None}
    return {"run_id": run_id(cfg), "experiment": cfg.experiment, "status": status, **val,
            "test_acc": last.get("test_acc"), "test_loss": last.get("test_loss"),
            "best_test_acc": max(accs) if accs else None,
            "test_acc_running_bn": last.get("test_acc_running_bn"),
            "train_loss": last.get("train_loss"), "train_acc": last.get("train_acc"),
            "epochs_completed": len(history), "steps": steps, "wall_s": round(wall_s, 3),
            "eval_bn": cfg.eval.bn, "device": str(device), **lm_metrics(cfg, history), **extra,
            "config": cfg.model_dump()}


def lm_metrics(cfg: RunConfig, history: list[dict]) -> dict:
    """A language model's result (task language_model: lower loss is better): the losses are in
    nats per character; the same in bits per character (÷ ln 2) and the best (lowest)
    validation and test loss. Nothing for a classifier, whose result.json stays as it was."""
    from abexp.registry import DATASETS
    record = DATASETS.find(cfg.data.name)
    if record is None or not record.lower_is_better:
        return {}
    last = history[-1] if history else {}
    out: dict = {}
    for split in ("train", "val", "test"):
        loss = last.get(f"{split}_loss")
        out[f"{split}_bpc"] = None if loss is None else float(loss) / math.log(2)
    for split in ("val", "test"):
        losses = [r[f"{split}_loss"] for r in history
                  if r.get(f"{split}_loss") is not None and math.isfinite(r[f"{split}_loss"])]
        out[f"best_{split}_loss"] = min(losses) if losses else None
    return out


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as CPU tensors: model.pt loads on a machine without a GPU, no map_location."""
    return {k: v.detach().cpu() for k, v in state.items()}
