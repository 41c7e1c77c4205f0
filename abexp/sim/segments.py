"""Per-segment sums and scales of flat vectors (one segment per parameter tensor), at memory speed.

AB needs, per parameter tensor, the dot products of the gradient and the velocity and their
squared norms, and then scales each tensor's gradient by its own factor. ``segment_reduce`` does
the sums in one call, but on a CPU it is a scalar loop (one float32 addition after another), and
``repeat_interleave`` to spread the factors is slower still: on a ResNet-50-sized vector AB's
update cost 13x SGDM's. A Python loop over the tensors' views is fast on a CPU but costs
3 to 4 kernel launches per tensor on a GPU, and its count grows with the tensors and the runs.

Here the flat vector is cut into fixed blocks of ``block`` elements. A block inside one segment
is summed as a row of a [blocks, block] view (vectorised, and the same order on every device and
thread count); the few blocks that straddle a segment boundary (and the ragged tail) are read
element by element. ``segment_reduce`` then adds, per segment in flat order, its block sums and
its boundary elements. The scale is applied the same way: one broadcast multiply over the
inner blocks, one gather-multiply-scatter over the boundary elements. The number of tensor
operations is fixed: it depends neither on the number of segments nor on leading batch
dimensions (K packed runs as a [K, P] buffer), and each row's result is independent of K.

Numerics: the sums differ from ``segment_reduce``'s sequential float32 sums in rounding only
(they are closer to the exact value: block sums are pairwise); docs/implementation.md gives the
tolerance.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 256


class Segments:
    """Contiguous segments of a flat vector of ``sum(sizes)`` elements."""

    def __init__(self, sizes: list[int], device, block: int = BLOCK):
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"segments must be non-empty: {sizes}")
        self.sizes, self.numel, self.block = sizes, sum(sizes), block
        bounds = np.cumsum([0] + sizes)
        n_full = self.numel // block  # complete blocks; the tail after them is read element-wise
        starts = np.arange(n_full) * block
        first_seg = np.searchsorted(bounds, starts, side="right") - 1
        last_seg = np.searchsorted(bounds, starts + block - 1, side="right") - 1
        inner = first_seg == last_seg
        self.n_full = n_full
        # elements of the straddling blocks and of the tail, in flat order
        loose = [np.arange(s, s + block) for s in starts[~inner]] + [np.arange(n_full * block, self.numel)]
        loose_idx = np.concatenate(loose).astype(np.int64) if loose else np.zeros(0, np.int64)
        loose_seg = np.searchsorted(bounds, loose_idx, side="right") - 1
        # units: the inner blocks' sums, then the loose elements; ordered by flat position, so
        # each segment's units are contiguous and in flat order
        inner_blocks = np.nonzero(inner)[0]
        positions = np.concatenate([starts[inner_blocks], loose_idx])
        unit_seg = np.concatenate([first_seg[inner_blocks], loose_seg])
        order = np.argsort(positions, kind="stable")
        counts = np.bincount(unit_seg, minlength=len(sizes))
        self.n_inner = len(inner_blocks)
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=device)
        self.inner_blocks = as_tensor(inner_blocks)
        self.loose_idx = as_tensor(loose_idx)
        self.order = as_tensor(order)
        self.lengths = as_tensor(counts)
        # scale spreading: per complete block, the segment of an inner block, or the extra last
        # entry (scale 1) for a straddling one (its elements are scaled as loose elements)
        block_seg = np.where(inner, first_seg, len(sizes))
        self.block_seg = as_tensor(block_seg)
        self.loose_seg = as_tensor(loose_seg)

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """[..., P] -> [..., S]: the sum of each segment, along the last dimension."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.numel)
        blocks = flat[:, :self.n_full * self.block].view(flat.shape[0], self.n_full, self.block)
        block_sums = blocks.sum(-1).index_select(1, self.inner_blocks)  # straddling ones unused
        units = torch.cat([block_sums, flat.index_select(1, self.loose_idx)], dim=1).index_select(1, self.order)
        lengths = self.lengths.expand(flat.shape[0], -1)
        out = torch.segment_reduce(units, "sum", lengths=lengths, axis=1, unsafe=True)
        return out.view(*lead, len(self.sizes))

    def scale_(self, x: torch.Tensor, scale: torch.Tensor) -> None:
        """x[..., segment s] *= scale[..., s], in place (x contiguous, [..., P])."""
        flat = x.view(-1, self.numel)
        scale = scale.reshape(flat.shape[0], len(self.sizes))
        extended = torch.cat([scale, torch.ones_like(scale[:, :1])], dim=1)
        blocks = flat[:, :self.n_full * self.block].view(flat.shape[0], self.n_full, self.block)
        blocks.mul_(extended.index_select(1, self.block_seg).unsqueeze(-1))
        loose = flat.index_select(1, self.loose_idx).mul_(scale.index_select(1, self.loose_seg))
        flat.index_copy_(1, self.loose_idx, loose)
