"""No host synchronisation per step: what a GPU would wait on, found by the dispatcher on CPU.

The reference for "would sync" is the list of operations whose results the host must read
(or whose output size depends on device data); the auditor is first checked against plain
examples of each, then used to show that a training epoch's host reads do not grow with its
number of steps (they happen once per epoch, not once per step).
"""

from collections import Counter

import pytest
import torch

from abexp.config import load_config
from abexp.tools.host_sync import HostSyncAudit
from abexp.train.packed import PackedRun
from abexp.train.run import Run


def audit(fn) -> list[str]:
    with HostSyncAudit() as a:
        fn()
    return a.found


def test_auditor_flags_blocking_ops_and_passes_their_async_forms():
    g, lengths = torch.randn(10), torch.tensor([3, 7])
    mask, index = g > 0, torch.tensor([1, 2])
    blocking = [lambda: g.sum().item(), lambda: float(g.sum()), lambda: bool(g.sum() > 0),
                lambda: torch.tensor([0.5, 0.2]), lambda: g[mask], lambda: g.nonzero(),
                lambda: torch.segment_reduce(g, "sum", lengths=lengths),
                lambda: g.repeat_interleave(lengths[:1].expand(10))]
    for fn in blocking:
        assert len(audit(fn)) == 1
    non_blocking = [lambda: g.sum(), lambda: g[index], lambda: torch.where(mask, g, 0.0),
                    lambda: torch.segment_reduce(g, "sum", lengths=lengths, unsafe=True),
                    lambda: g.repeat_interleave(lengths[:1].expand(10), output_size=30),
                    lambda: g.to("cpu"), lambda: (g * 2).exp_()]
    for fn in non_blocking:
        assert audit(fn) == []


SYNTH = ["data.name=synthetic", "model.name=resnet8", "train.batch_size=8", "schedule.name=constant"]


def epoch_syncs(steps: int, extra: list[str], tmp_path) -> list[str]:
    cfg = load_config(None, SYNTH + [f"data.synthetic_size={8 * steps}", *extra])
    run = Run(cfg, tmp_path, "cpu", log=lambda s: None)
    run.train_epoch()  # the first epoch draws the delay chunk: leave it out
    return audit(run.train_epoch)


@pytest.mark.parametrize("optim", [
    ["optim.name=sgdm"], ["optim.name=ab"], ["optim.name=ab", "optim.ab_cosine=global"],
    ["optim.name=sc"], ["optim.name=lwp"], ["optim.name=dcasgd"], ["optim.name=salr"],
    ["optim.name=sgdm", "optim.nesterov=true"],
])
def test_host_reads_per_epoch_do_not_grow_with_steps(optim, tmp_path):
    extra = optim + ["delay.kind=uniform", "delay.steps=3"]
    few, many = epoch_syncs(2, extra, tmp_path / "a"), epoch_syncs(7, extra, tmp_path / "b")
    assert few == many, f"host syncs per epoch, 2 vs 7 steps: {Counter(few)} vs {Counter(many)}"
    assert len(many) <= 8  # the epoch's metric reads and the divergence check


def test_packed_epoch_host_reads_do_not_grow_with_steps(tmp_path):
    def syncs(steps):
        base = SYNTH + [f"data.synthetic_size={8 * steps}", "delay.kind=uniform", "delay.steps=3"]
        cfgs = [load_config(None, base + [f"seed={i}", f"optim.name={o}"]) for i, o in enumerate(["sgdm", "ab"])]
        pack = PackedRun(cfgs, [tmp_path / str(i) for i in range(2)], "cpu", log=lambda s: None)
        pack.train_epoch()
        return audit(pack.train_epoch)

    assert syncs(2) == syncs(6)


def test_evaluation_and_epoch_ends_copy_nothing_to_the_device(tmp_path):
    """Evaluation made a host->device copy per call (the count, torch.tensor(float(n))) and
    read each figure separately; the epoch end likewise. Now the count is a fill on the device
    and the figures come back in one .tolist() (a device->host copy on a GPU; on the CPU the
    tensor is already there, so the audit sees nothing at all). The values equal a plain
    recomputation."""
    import torch.nn.functional as F

    cfg = load_config(None, SYNTH + ["data.synthetic_size=32", "delay.steps=2"])
    run = Run(cfg, tmp_path / "r", "cpu", log=lambda s: None)
    run.evaluate()  # the first call builds the cached normalisation constants
    assert audit(run.evaluate) == []
    assert not [f for f in audit(run.train_epoch) if "lift_fresh" in f]
    (loss, acc), = run.evaluate()
    run.use_current_weights()
    run.model.eval()
    with torch.no_grad():
        test = list(run.batches.test(cfg.eval.batch_size))
        logits = [run.model(x) for x, _ in test]
    run.model.train()
    n = sum(len(y) for _, y in test)
    want_loss = sum(float(F.cross_entropy(lg, y, reduction="sum")) for lg, (_, y) in zip(logits, test)) / n
    want_acc = sum(int((lg.argmax(1) == y).sum()) for lg, (_, y) in zip(logits, test)) / n
    assert loss == pytest.approx(want_loss, rel=1e-9) and acc == want_acc

    cfgs = [load_config(None, SYNTH + ["data.synthetic_size=32", "delay.steps=2", f"seed={i}"]) for i in range(2)]
    pack = PackedRun(cfgs, [tmp_path / str(i) for i in range(2)], "cpu", log=lambda s: None)
    pack.evaluate()
    assert audit(pack.evaluate) == []
    assert not [f for f in audit(pack.train_epoch) if "lift_fresh" in f]
