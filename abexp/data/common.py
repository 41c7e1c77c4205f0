"""What every dataset reader shares: the error a bad data folder raises, the in-memory image
container, default data folders. Imports nothing else of abexp's data."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

class DataError(Exception):
    """A data folder that is missing or malformed; the message names the path."""


@dataclass
class ImageData:
    """uint8 images [N, C, H, W] and int64 labels, on one device, with normalisation constants
    and the augmentation that suits the images (crop padding; whether a mirror image is still
    the same class)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10
    crop_pad: int = 4
    flip: bool = True
    _constants_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    def to(self, device: torch.device | str) -> "ImageData":
        return replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                       test_x=self.test_x.to(device), test_y=self.test_y.to(device))

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


def data_root(cfg) -> str | None:
    """data.root, or the dataset's default folder (None: the IDX reader picks its own)."""
    return cfg.data.root or DEFAULT_ROOTS.get(cfg.data.name)
