"""CUDA-only checks of the device paths a CPU cannot exercise (skipped where no GPU is present).

Run them on a GPU machine with ``.venv/bin/python -m pytest tests/test_gpu.py``.
"""

import pytest
import torch

from abexp.config import load_config
from abexp.packed import PackedRun
from abexp.train import Run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SYNTH = ["data.name=synthetic", "model.name=resnet8", "train.batch_size=32", "data.synthetic_size=256",
         "schedule.name=constant", "delay.kind=uniform", "delay.steps=4", "train.precision=fp32"]


def quiet(msg: str) -> None:
    pass


PIPELINE = ["delay.kind=pipeline", "delay.stages=4", "delay.steps=0"]


@pytest.mark.parametrize("optim,extra", [(o, []) for o in ("sgdm", "ab", "sc", "lwp", "dcasgd", "ab_adamw")]
                         + [(o, PIPELINE) for o in ("sgdm", "ab", "sc", "lwp")],
                         ids=lambda v: v if isinstance(v, str) else ("pipeline" if v else "uniform"))
def test_training_steps_never_make_the_host_wait(optim, extra, tmp_path):
    cfg = SYNTH + [f"optim.name={optim}"] + extra
    if extra:  # pipeline delays replace the uniform ones
        cfg = [o for o in cfg if not o.startswith("delay.")] + extra
    run = Run(load_config(None, cfg), tmp_path, "cuda", log=quiet)
    batches = run.batches.epoch(0)
    run.train_step(*next(batches), 0.01)  # warm-up: cuDNN plans, the delay chunk
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        for x, y in batches:
            run.train_step(x, y, 0.01)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(run.engine.w).all()


def test_packed_step_on_cuda_equals_separate_steps(tmp_path):
    runs = [["seed=0", "optim.name=sgdm"], ["seed=1", "optim.name=ab", "optim.rho=0.5"],
            ["seed=2", "optim.name=sc", "optim.momentum=0.8"]]
    cfgs = [load_config(None, SYNTH + r) for r in runs]
    pack = PackedRun(cfgs, [tmp_path / str(i) for i in range(3)], "cuda", log=quiet)
    singles = [Run(c, tmp_path / "s", "cuda", log=quiet) for c in cfgs]
    batches = [next(iter(b.epoch(0))) for b in pack.batches]
    pack.train_step([b[0] for b in batches], [b[1] for b in batches], [0.01] * 3)
    for run, (x, y), engine in zip(singles, batches, pack.engines):
        run.train_step(x, y, 0.01)
        assert float((engine.w - run.engine.w).norm() / run.engine.w.norm()) < 1e-4


@pytest.mark.parametrize("extra", [["train.precision=bf16"], ["train.precision=tf32", "train.channels_last=true"],
                                   ["train.compile=true"]])
def test_fast_path_options_train_on_cuda(extra, tmp_path):
    run = Run(load_config(None, SYNTH + ["optim.name=ab", "optim.lr=0.05", *extra]), tmp_path, "cuda", log=quiet)
    before = run.engine.w.clone()
    stats = run.train_epoch()
    assert not stats["diverged"] and 0.0 <= stats["train_acc"] <= 1.0
    assert not torch.equal(before, run.engine.w)


def test_cuda_batches_are_seeded_crops_and_flips():
    from abexp.data import Batches, make_synthetic

    data = make_synthetic(64).to("cuda")
    a, b = (list(Batches(data, 16, True, seed=3).epoch(2)) for _ in range(2))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    plain = list(Batches(data, 16, False, seed=3).epoch(2))
    assert all(torch.equal(ya, yp) for (_, ya), (_, yp) in zip(a, plain))  # same order, augmented
