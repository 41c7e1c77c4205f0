"""CUDA-only checks of the device paths a CPU cannot exercise (skipped where no GPU is present;
failed instead under ``make gpu-check``, which sets ABEXP_REQUIRE_GPU=1).

Run them on a GPU machine with ``make gpu-check`` (writes JUnit XML) or
``python -m pytest tests/test_gpu.py``.
"""

import contextlib
import os

import pytest
import torch

from abexp.config import load_config
from abexp.train.packed import PackedRun
from abexp.train.run import Run, evaluate, set_precision
from abexp.train.start import train_run

REQUIRED = os.environ.get("ABEXP_REQUIRE_GPU") == "1"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not REQUIRED, reason="needs a CUDA device")

SYNTH = ["data.name=synthetic", "model.name=resnet8", "train.batch_size=32", "data.synthetic_size=256",
         "schedule.name=constant", "delay.kind=uniform", "delay.steps=4", "train.precision=fp32"]
CONSTANT = [o for o in SYNTH if not o.startswith("delay.")] + ["delay.steps=4"]


def quiet(msg: str) -> None:
    pass


def test_cuda_is_available():
    assert torch.cuda.is_available(), "no CUDA device visible to this python"


def no_host_sync(fn):
    """Run ``fn`` with every synchronising CUDA call raising."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


PIPELINE = ["delay.kind=pipeline", "delay.stages=4", "delay.steps=0"]


@pytest.mark.parametrize("optim,extra", [(o, []) for o in ("sgdm", "ab", "sc", "lwp", "dcasgd", "ab_adamw")]
                         + [(o, PIPELINE) for o in ("sgdm", "ab", "sc", "lwp")]
                         + [("ab", ["train.precision=bf16"]), ("ab", ["train.channels_last=true"])],
                         ids=lambda v: v if isinstance(v, str) else ("-".join(v) or "uniform"))
def test_training_steps_never_make_the_host_wait(optim, extra, tmp_path):
    cfg = SYNTH + [f"optim.name={optim}"] + extra
    if any(o.startswith("delay.") for o in extra):  # pipeline delays replace the uniform ones
        cfg = [o for o in cfg if not o.startswith("delay.")] + extra
    run = Run(load_config(None, cfg), tmp_path, "cuda", log=quiet)
    batches = run.batches.epoch(0)
    run.train_step(*next(batches), 0.01)  # warm-up: cuDNN plans, the delay chunk

    def steps():
        for x, y in batches:
            run.train_step(x, y, 0.01)
    no_host_sync(steps)
    assert torch.isfinite(run.engine.w).all()


def test_packed_steps_never_make_the_host_wait(tmp_path):
    cfgs = [load_config(None, SYNTH + [f"seed={i}", f"optim.name={o}"]) for i, o in enumerate(("sgdm", "ab"))]
    pack = PackedRun(cfgs, [tmp_path / str(i) for i in range(2)], "cuda", log=quiet)
    batches = [list(b.epoch(0)) for b in pack.batches]
    step = lambda i: pack.train_step([b[i][0] for b in batches], [b[i][1] for b in batches], [0.01, 0.01])  # noqa: E731
    step(0)
    no_host_sync(lambda: [step(i) for i in range(1, len(batches[0]))])


def test_evaluation_never_makes_the_host_wait_per_batch(tmp_path):
    run = Run(load_config(None, SYNTH + ["optim.name=ab"]), tmp_path, "cuda", log=quiet)
    run.use_current_weights()
    test = list(run.batches.test(64))
    evaluate(run.model, iter(test), run.device, "fp32")  # warm-up
    sums = no_host_sync(lambda: evaluate(run.model, iter(test), run.device, "fp32"))
    assert int(sums[2]) == sum(len(y) for _, y in test)


def test_the_vectorised_packed_update_equals_the_per_run_engines_on_cuda(tmp_path):
    """abexp.sim.batched on CUDA against each run's own engine (vectorise=False), six steps of
    the same deterministic pack: SGDM rows bitwise (addcmul_ with a [rows, 1] factor rounds as
    add_ with a scalar alpha, as on the CPU); AB rows within 1e-5 (their per-tensor sums of a
    [rows, P] buffer were bitwise per row on the CPU; the CUDA reductions' order is unverified)."""
    runs = [["seed=0", "optim.name=sgdm"], ["seed=1", "optim.name=ab", "optim.rho=0.5"],
            ["seed=2", "optim.name=sgdm", "optim.nesterov=true", "optim.weight_decay_on=stale"],
            ["seed=3", "optim.name=ab", "optim.momentum=0.5"], ["seed=4", "optim.name=sc"]]
    cfgs = [load_config(None, SYNTH + r + ["train.deterministic=true"]) for r in runs]
    packs = [PackedRun(cfgs, [tmp_path / str(i) for i in range(5)], "cuda", log=quiet, vectorise=v)
             for v in (False, True)]
    assert packs[1].n_together == 4
    batches = [list(b.epoch(0))[:6] for b in packs[0].batches]
    for i in range(6):
        for pack in packs:
            pack.train_step([b[i][0] for b in batches], [b[i][1] for b in batches], [0.01 * (1 + i)] * 5)
    for run, loop, together in zip(runs, packs[0].engines, packs[1].engines):
        if "optim.name=ab" in run:
            assert float((loop.w - together.w).norm() / loop.w.norm()) < 1e-5
        else:
            assert torch.equal(loop.w, together.w), run


def test_ten_packed_steps_at_a_constant_delay_equal_separate_runs(tmp_path):
    """Ten steps at D = 4 (stale gradients, momentum built up: AB and SC act), small lr so that
    round-off does not grow: the displacement of every run matches its separate run to 1e-3,
    so a 1% error in any run's gradient or update fails."""
    runs = [["seed=0", "optim.name=sgdm"], ["seed=1", "optim.name=ab", "optim.rho=0.5"],
            ["seed=2", "optim.name=sc", "optim.momentum=0.8"]]
    cfgs = [load_config(None, CONSTANT + r) for r in runs]
    pack = PackedRun(cfgs, [tmp_path / str(i) for i in range(3)], "cuda", log=quiet)
    singles = [Run(c, tmp_path / "s", "cuda", log=quiet) for c in cfgs]
    starts = [run.engine.w.clone() for run in singles]
    batches = [list(b.epoch(0))[:10] for b in pack.batches]
    assert all(len(b) == 10 for b in batches)
    for i in range(10):
        pack.train_step([b[i][0] for b in batches], [b[i][1] for b in batches], [0.002] * 3)
        for run, b in zip(singles, batches):
            run.train_step(*b[i], 0.002)
    for run, engine, w0 in zip(singles, pack.engines, starts):
        moved = run.engine.w - w0
        assert float(moved.norm()) > 0
        assert float((engine.w - run.engine.w).norm() / moved.norm()) < 1e-3


@contextlib.contextmanager
def precision_flags(precision: str):
    """The TF32 flags of ``precision`` (fp32: off, true fp32 products) for the block, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_precision(precision)
    assert torch.backends.cuda.matmul.allow_tf32 is (precision == "tf32")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("extra,tolerance", [
    (["train.channels_last=true"], 1e-4), (["train.compile=true"], 1e-4),
    (["train.precision=tf32"], 5e-3), (["train.precision=tf32", "train.channels_last=true"], 5e-3),
    (["train.precision=bf16"], 3e-2), (["train.precision=bf16", "train.channels_last=true"], 3e-2)],
    ids=lambda v: "-".join(v) if isinstance(v, list) else str(v))
def test_fast_path_options_take_the_fp32_eager_step(extra, tolerance, tmp_path):
    """One step from the same weights on the same batch: the update of each fast path equals
    the fp32 eager update within the precision's own error."""
    base = load_config(None, SYNTH + ["optim.name=ab", "optim.lr=0.05"])
    fast = load_config(None, SYNTH + ["optim.name=ab", "optim.lr=0.05", *extra])
    ref, run = Run(base, tmp_path / "a", "cuda", log=quiet), Run(fast, tmp_path / "b", "cuda", log=quiet)
    assert torch.equal(ref.engine.w, run.engine.w)
    x, y = next(iter(ref.batches.epoch(0)))
    w0 = ref.engine.w.clone()
    # precision flags are process-wide and were last set by the second Run: each step gets its own
    with precision_flags(base.train.precision):
        ref.train_step(x, y, 0.05)
    with precision_flags(fast.train.precision):
        run.train_step(x, y, 0.05)
    want, got = ref.engine.w - w0, run.engine.w - w0
    assert float((got - want).norm() / want.norm()) < tolerance


def test_resume_on_the_gpu_equals_an_uninterrupted_run(tmp_path):
    cfg = load_config(None, CONSTANT + ["optim.name=ab", "train.epochs=2", "train.deterministic=true"])
    whole = train_run(cfg, tmp_path / "whole", device="cuda", log=quiet)
    assert train_run(cfg, tmp_path / "cut", device="cuda", stop_after_epochs=1, log=quiet) is None
    resumed = train_run(cfg, tmp_path / "cut", device="cuda", log=quiet)
    assert resumed["test_acc"] == whole["test_acc"]
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("whole", "cut"))
    assert all(v.device.type == "cpu" for v in a.values())  # loadable where there is no GPU
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_batches_are_seeded_crops_and_flips():
    from abexp.data.images import Batches, make_synthetic

    data = make_synthetic(64).to("cuda")
    a, b = (list(Batches(data, 16, True, seed=3).epoch(2)) for _ in range(2))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    plain = list(Batches(data, 16, False, seed=3).epoch(2))
    assert all(torch.equal(ya, yp) for (_, ya), (_, yp) in zip(a, plain))  # same order, augmented
