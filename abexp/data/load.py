"""Which dataset a run config names: checked before any worker starts (``preflight``), then
loaded, subset and moved onto the run's device."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from abexp.data.common import IDX_DATASETS, DataError, ImageData, data_root, hold_out
from abexp.data.images import cifar10_folder, load_cifar10, load_digits, make_synthetic, take_subset


def load_dataset(cfg) -> ImageData:
    """The whole in-memory dataset a run config names, on the CPU, with the config's
    augmentation overrides applied."""
    d = cfg.data
    if d.name == "cifar10":
        data = load_cifar10(data_root(cfg), d.download)
    elif d.name in IDX_DATASETS:
        from abexp.data.idx import load_idx_dataset
        data = load_idx_dataset(d.name, d.root, d.download)
    elif d.name == "digits":
        data = load_digits(d.split_seed)
    elif d.name == "synthetic":
        data = make_synthetic(d.synthetic_size, seed=d.split_seed)
    else:
        raise DataError(f"data.name={d.name} is not an in-memory dataset")
    if d.crop_pad is not None:
        data = replace(data, crop_pad=d.crop_pad)
    if d.flip is not None:
        data = replace(data, flip=d.flip)
    return data


def preflight(cfg) -> None:
    """Check that a run's data is present and well-formed, before any worker starts: the same
    DataError a worker would raise, but raised once, up front, naming the file."""
    d = cfg.data
    if d.name == "cifar10" and not d.download:
        folder = cifar10_folder(data_root(cfg))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            if not (folder / name).is_file():
                raise DataError(f"data.root: CIFAR-10 not found: {folder / name} is missing (point "
                                "data.root at a local copy of cifar-10-batches-py, or set "
                                "data.download: true)")
    elif d.name in IDX_DATASETS:
        from abexp.data.idx import read_arrays
        read_arrays(d.name, d.root, d.download)
    elif d.name == "imagenet":
        from abexp.data.imagenet import check_image_folder
        check_image_folder(Path(data_root(cfg)))


def load_image_data(cfg, device: torch.device | str) -> ImageData:
    """The in-memory dataset a run config names, subset, with data.val_split of the (subset)
    training examples held out, and moved to ``device``."""
    d = cfg.data
    data = take_subset(load_dataset(cfg), d.subset, d.test_subset, d.split_seed)
    return hold_out(data, d.val_split, d.split_seed).to(device)
