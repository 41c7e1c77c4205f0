"""Import torchvision on a CPU-only torch whose torchvision wheel is a CUDA build.

The torchvision 0.28.0 wheel that pins torch 2.13.0 can be a CUDA build. Against the CPU torch
its C++ extension does not load, and ``import torchvision`` then fails while registering
Python fake kernels for ``torchvision::nms`` ("operator torchvision::nms does not exist").
Defining the two operator schemas first lets the import succeed: models, transforms and
datasets are pure Python and work; the C++ ops (nms, roi_align, ...) stay unavailable, and
abexp uses none of them. This is the only place abexp imports torchvision.
"""

from __future__ import annotations

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_keepalive: list = []


def _define_missing_schemas() -> None:
    missing = [name for name in _SCHEMAS if not _schema_exists(name)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _keepalive.append(lib)  # the schemas live as long as the Library object


def _schema_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def import_torchvision():
    """Return the torchvision module, patching the op schemas only when the plain import fails."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    _define_missing_schemas()
    import sys
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]  # drop the half-initialised package before importing again
    import torchvision
    return torchvision
