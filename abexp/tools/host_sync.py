"""Find the operations that would make the host wait for a GPU — on any device, even a CPU.

On a GPU the host runs ahead of the device, queueing kernels; an operation that needs a device
value on the host stalls that queue until the device catches up. The ones a training step can
hit: reading a value (``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``), copying Python data
to the device (``torch.tensor([...], device=...)`` is a blocking copy from pageable memory),
and operations whose output size depends on the data (``nonzero``, boolean-mask indexing,
``unique``, ``repeat_interleave`` without ``output_size``, ``segment_reduce``'s validation of
its lengths). The dispatcher sees all of them whatever the device, so a CPU run can list a
step's syncs; on a GPU ``torch.cuda.set_sync_debug_mode("error")`` checks the same thing.

    with HostSyncAudit() as audit:
        run.train_epoch()
    print(audit.found)      # e.g. ['aten._local_scalar_dense.default: reads a value on the host']
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS = {
    aten._local_scalar_dense.default: "reads a value on the host",
    aten.lift_fresh.default: "copies Python data to the device",
    aten.nonzero.default: "output size depends on the data",
    aten.masked_select.default: "output size depends on the data",
    aten._unique2.default: "output size depends on the data",
    aten.unique_dim.default: "output size depends on the data",
    aten.unique_consecutive.default: "output size depends on the data",
}


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def sync_reason(func, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)`` would block the host on a GPU, or None."""
    if func in _ALWAYS:
        return _ALWAYS[func]
    packet = func.overloadpacket
    if packet in (aten.index, aten.index_put, aten.index_put_) and any(_is_mask(i) for i in args[1] or ()):
        return "boolean-mask indexing (output size depends on the data)"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if packet is aten.segment_reduce and not kwargs.get("unsafe", False):
        return "segment_reduce validates its lengths on the host (pass unsafe=True)"
    if packet in (aten._to_copy, aten.copy_):
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0].device if packet is aten.copy_ else kwargs.get("device")
        if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst).type == "cpu" \
                and src.device.type != "cpu":
            return "copies a device tensor to the host"
    return None


class HostSyncAudit(TorchDispatchMode):
    """Records, in order, every operation in its block that would stall the host on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            self.found.append(f"{func}: {reason}")
        return func(*args, **kwargs)
