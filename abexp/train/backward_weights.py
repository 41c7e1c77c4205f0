"""A backward pass that sees other weights than its forward pass: pipelining without stashing.

In Pipelined Backpropagation without weight stashing a stage's forward pass ran at old weights
and its backward pass runs at the weights the stage holds when the error arrives (Kosson et al.,
2021: "inconsistency between the weights used on the forward and backward passes"). For every
layer of a ResNet, the weights enter the backward pass only where autograd saved them: a
convolution's or linear layer's input gradient is the output gradient times the saved weight, a
batch norm's uses the saved scale; the weight gradients use the saved activations, which the
forward pass computed at the forward weights. So swapping the *saved* weights for the backward
weights is exactly the unstashed pipeline, at no extra compute: ``saved_tensors_hooks`` replace
each saved tensor that is a view of the forward weights' flat buffer by the same view of the
backward weights. (A bf16 autocast or a compiled graph saves copies instead of views; the config
refuses both with ``delay.stashing: false``.)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def backward_weights(forward: torch.Tensor, backward: torch.Tensor) -> Iterator[None]:
    """Within the block, tensors autograd saves that view ``forward``'s storage are read back in
    the backward pass as the same view (shape, strides, offset) of ``backward``, a flat tensor
    of the same size. Both must stay unchanged until the backward pass has run."""
    if forward.shape != backward.shape or not backward.is_contiguous():
        raise ValueError("backward weights must be a contiguous tensor shaped like the forward ones")
    storage = forward.untyped_storage().data_ptr()
    base = forward.storage_offset()

    def pack(saved: torch.Tensor):
        if saved.untyped_storage().data_ptr() == storage:
            return (saved.shape, saved.stride(), saved.storage_offset() - base)
        return saved

    def unpack(packed):
        if isinstance(packed, tuple):
            shape, stride, offset = packed
            return backward.as_strided(shape, stride, backward.storage_offset() + offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
