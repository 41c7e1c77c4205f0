"""Per-segment sums and scales (abexp.sim.segments) against naive references, and AB's brake
against the formula it replaced (segment_reduce + repeat_interleave, kept here as the reference)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from abexp.config import OptimCfg
from abexp.sim.optim import DelayedOptimizer, segment_cosine
from abexp.sim.segments import Segments
from abexp.train.models import build_model

# block 256: segments shorter than a block, straddling blocks, exact multiples, a ragged tail
SIZES = [[5], [256], [300], [1, 2, 3, 600, 256, 512, 7], [1000, 1000, 1000, 10, 4096, 1]]


def old_brake(g: torch.Tensor, v: torch.Tensor, sizes: list[int], rho: float) -> torch.Tensor:
    """AB's per-tensor brake as abexp computed it before abexp.sim.segments (the naive reference)."""
    lengths = torch.tensor(sizes)
    dot = torch.segment_reduce(g * v, "sum", lengths=lengths, unsafe=True)
    gg = torch.segment_reduce(g * g, "sum", lengths=lengths, unsafe=True)
    vv = torch.segment_reduce(v * v, "sum", lengths=lengths, unsafe=True)
    denom = gg.sqrt() * vv.sqrt()
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(dot))
    return g * (1.0 - rho * cos).repeat_interleave(lengths, output_size=g.numel())


def exact_cosines(g: torch.Tensor, v: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    g, v = g.double(), v.double()
    return torch.stack([(a @ b) / (a.norm() * b.norm()) for a, b in zip(g.split(sizes), v.split(sizes))])


@pytest.mark.parametrize("sizes", SIZES)
def test_sums_and_scales_against_naive_per_segment_loops(sizes):
    torch.manual_seed(0)
    seg = Segments(sizes, "cpu")
    x = torch.randn(3, sum(sizes))
    exact = torch.stack([torch.stack([c.double().sum() for c in row.split(sizes)]) for row in x])
    got = seg.sums(x)
    assert got.shape == (3, len(sizes)) and got.dtype == torch.float32
    scale = torch.stack([torch.stack([c.abs().double().sum() for c in row.split(sizes)]) for row in x])
    assert ((got.double() - exact).abs() <= 1e-6 * scale + 1e-30).all()
    factors = torch.rand(3, len(sizes))
    y = x.clone()
    seg.scale_(y, factors)
    assert torch.equal(y, x * factors.repeat_interleave(torch.tensor(sizes), dim=1))  # bitwise


@pytest.mark.parametrize("sizes", SIZES)
def test_each_row_is_what_it_would_be_alone(sizes):
    """K rows ([K, P], K packed runs) give each row bitwise what a [P] vector gives."""
    torch.manual_seed(1)
    seg = Segments(sizes, "cpu")
    x, factors = torch.randn(4, sum(sizes)), torch.rand(4, len(sizes))
    together = x.clone()
    seg.scale_(together, factors)
    sums = seg.sums(x)
    for k in range(4):
        assert torch.equal(sums[k], seg.sums(x[k]))
        alone = x[k].clone()
        seg.scale_(alone, factors[k])
        assert torch.equal(together[k], alone)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_the_number_of_operations_depends_neither_on_segments_nor_on_rows():
    counts = set()
    for sizes, rows in (([3, 700], 1), ([7] * 40 + [5000] * 30, 1), ([7] * 40 + [5000] * 30, 8)):
        seg = Segments(sizes, "cpu")
        x, f = torch.randn(rows, sum(sizes)), torch.rand(rows, len(sizes))
        with _CountOps() as mode:
            seg.sums(x)
            seg.scale_(x, f)
        counts.add(mode.ops)
    assert len(counts) == 1


def test_ab_brake_matches_the_replaced_formula_within_the_documented_tolerance():
    """docs/implementation.md: per-tensor cosines within 5e-6 of the old's sequential float32
    sums on a ResNet-8, and at least as close to the exact (float64) cosine."""
    torch.manual_seed(2)
    sizes = [p.numel() for p in build_model("resnet8", 10).parameters()]
    for trial in range(3):
        g, v = torch.randn(sum(sizes)), torch.randn(sum(sizes)) + 0.5 * trial
        v[: sizes[0]] = 0.0  # a tensor without velocity: cosine 0, scale 1
        new = segment_cosine(g, v, Segments(sizes, "cpu"))
        lengths = torch.tensor(sizes)
        old = torch.segment_reduce(g * v, "sum", lengths=lengths, unsafe=True) / (
            torch.segment_reduce(g * g, "sum", lengths=lengths, unsafe=True).sqrt()
            * torch.segment_reduce(v * v, "sum", lengths=lengths, unsafe=True).sqrt())
        exact = exact_cosines(g, v, sizes)
        assert new[0] == 0.0
        assert (new[1:].double() - old[1:].double()).abs().max() <= 5e-6
        assert (new[1:].double() - exact[1:]).abs().max() <= (old[1:].double() - exact[1:]).abs().max() + 1e-7
        opt = DelayedOptimizer(OptimCfg(name="ab", lr=0.1, momentum=0.9, rho=1.0, weight_decay=0.0),
                               sizes, [0.0], "cpu")
        opt.v.copy_(v)
        got = g.clone()
        opt._brake(got, opt.v)
        torch.testing.assert_close(got, old_brake(g, v, sizes, 1.0), rtol=4e-6, atol=1e-12)
