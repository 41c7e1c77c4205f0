"""What every dataset reader shares: the error a bad data folder raises, the in-memory image
container, default data folders. Imports nothing else of abexp's data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

class DataError(Exception):
    """A data folder that is missing or malformed; the message names the path."""


@dataclass
class ImageData:
    """uint8 images [N, C, H, W] and int64 labels, on one device, with normalisation constants
    and the augmentation that suits the images (crop padding; whether a mirror image is still
    the same class). ``val_x``/``val_y``: examples held out of the training set (data.val_split),
    else None."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10
    crop_pad: int = 4
    flip: bool = True
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None
    _constants_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    def to(self, device: torch.device | str) -> "ImageData":
        val = {} if self.val_x is None else {"val_x": self.val_x.to(device), "val_y": self.val_y.to(device)}
        return replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                       test_x=self.test_x.to(device), test_y=self.test_y.to(device), **val)

    def normalize(self, x_uint8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        mean, std = self._constants(x_uint8.device, dtype)
        return (x_uint8.to(dtype) / 255.0 - mean) / std

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as [1, C, 1, 1] device tensors, made once: building them from Python
        floats every batch would be a blocking host-to-device copy per step on a GPU."""
        key = (str(device), dtype)
        if key not in self._constants_cache:
            self._constants_cache[key] = tuple(torch.tensor(v, device=device, dtype=dtype).view(1, -1, 1, 1)
                                               for v in (self.mean, self.std))
        return self._constants_cache[key]


IDX_DATASETS = ("fashion_mnist", "mnist")
# Training examples of each dataset's full train split, for planning without loading it
# (digits: 1,797 images less the 20% test split; ImageNet: the ILSVRC-2012 train set).
TRAIN_EXAMPLES = {"cifar10": 50_000, "fashion_mnist": 60_000, "mnist": 60_000, "digits": 1_438,
                  "imagenet": 1_281_167}
DEFAULT_ROOTS = {"cifar10": "data/cifar10", "imagenet": "data/imagenet"}


def validation_indices(n: int, fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): round(fraction * n) of range(n) held out, each part in ascending order.
    Seeded from data.split_seed alone, never the run seed, so paired seeds train and select on
    the same examples; its own stream, so it is independent of data.subset's shuffle."""
    n_val = int(round(n * fraction))
    if not 0 < n_val < n:
        raise DataError(f"data.val_split: {fraction} of {n} training examples holds out {n_val}; "
                        "it must hold out at least one and keep at least one")
    seed = int.from_bytes(hashlib.sha256(f"val_split/{split_seed}".encode()).digest()[:8], "little") >> 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def hold_out(data: ImageData, fraction: float | None, split_seed: int) -> ImageData:
    """The data with ``fraction`` of its training examples moved to the validation set (none
    moved when fraction is None). Normalisation constants stay the dataset's: two numbers per
    channel computed over the whole training split, not refitted per held-out part."""
    if not fraction:
        return data
    kept, held = validation_indices(len(data.train_y), fraction, split_seed)
    return replace(data, train_x=data.train_x[kept], train_y=data.train_y[kept],
                   val_x=data.train_x[held], val_y=data.train_y[held])


def data_root(cfg) -> str | None:
    """data.root, or the dataset's default folder (None: the IDX reader picks its own)."""
    return cfg.data.root or DEFAULT_ROOTS.get(cfg.data.name)
