"""Which dataset a run config names: checked before any worker starts (``preflight``), then
loaded, subset and moved onto the run's device. The dataset's record (abexp.registry.DATASETS;
abexp.data.catalog for the built-in ones, a plugin's for its own) says how."""

from __future__ import annotations

from dataclasses import replace

import torch

from abexp.data.common import DataError, ImageData, TensorData, hold_out
from abexp.data.images import take_subset
from abexp.registry import DATASETS


def load_dataset(cfg) -> ImageData | TensorData:
    """The whole in-memory dataset a run config names, on the CPU, with the config's
    augmentation overrides applied (images only)."""
    d = cfg.data
    record = DATASETS.get(d.name)
    data = record.loader(cfg)
    if isinstance(data, TensorData):
        if data.num_classes is None:
            data = replace(data, num_classes=record.classes)
        if d.crop_pad is not None or d.flip is not None:
            raise DataError(f"data.crop_pad, data.flip: image augmentation; data.name={d.name} is "
                            f"{record.input_kind} data")
        return data.check(d.name)
    if not isinstance(data, ImageData):
        raise DataError(f"data.name={d.name}: its loader returned {type(data).__name__}, not "
                        "abexp.TensorData")
    if d.crop_pad is not None:
        data = replace(data, crop_pad=d.crop_pad)
    if d.flip is not None:
        data = replace(data, flip=d.flip)
    return data


def preflight(cfg) -> None:
    """Check that a run's data is present and well-formed, before any worker starts: the same
    DataError a worker would raise, but raised once, up front, naming the file."""
    check = DATASETS.get(cfg.data.name).preflight
    if check is not None:
        check(cfg)


def load_image_data(cfg, device: torch.device | str) -> ImageData | TensorData:
    """The in-memory dataset a run config names, subset, with data.val_split of the (subset)
    training examples held out, and moved to ``device``."""
    d = cfg.data
    data = take_subset(load_dataset(cfg), d.subset, d.test_subset, d.split_seed)
    return hold_out(data, d.val_split, d.split_seed).to(device)
