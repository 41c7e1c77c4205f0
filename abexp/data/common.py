"""What every dataset reader shares: the error a bad data folder raises, the in-memory image
and tensor containers, the validation split. Imports nothing else of abexp's data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

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


@dataclass
class TensorData:
    """A dataset that is not (necessarily) images: in-memory tensors of any dtype, e.g. tabular
    features (float) or token ids (int64), with int64 class labels; what a plugin's dataset
    function returns (``abexp.register_dataset``). Floating features are cast to the run's
    dtype, integer ones passed as they are. ``augment(x, generator) -> x``: an optional batched
    augmentation (none by default: tabular data has no crop or flip)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: Optional[int] = None  # None: the dataset record's classes
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None

    @property
    def channels(self) -> int:
        return self.train_x.shape[1] if self.train_x.dim() > 1 else 1

    def to(self, device: torch.device | str) -> "TensorData":
        val = {} if self.val_x is None else {"val_x": self.val_x.to(device), "val_y": self.val_y.to(device)}
        return replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                       test_x=self.test_x.to(device), test_y=self.test_y.to(device), **val)

    def normalize(self, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return x.to(dtype) if x.is_floating_point() else x

    def check(self, name: str) -> "TensorData":
        """Tensors of matching lengths and int64 labels: a DataError naming the dataset else."""
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not (torch.is_tensor(x) and torch.is_tensor(y)):
                raise DataError(f"data.name={name}: {split}_x and {split}_y must be torch tensors")
            # 1-D: a label per example; [N, T]: a label per token (a language model's targets)
            if y.dim() not in (1, 2) or y.dtype != torch.int64 or len(x) != len(y) or not len(y):
                raise DataError(f"data.name={name}: {split}_y must be a non-empty 1-D (or [N, T]) int64 tensor "
                                f"of len({split}_x) = {len(x)} labels (got {tuple(y.shape)}, {y.dtype})")
        if self.num_classes is not None and int(max(self.train_y.max(), self.test_y.max())) >= self.num_classes:
            raise DataError(f"data.name={name}: a label is >= classes = {self.num_classes}")
        return self


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


def hold_out(data, fraction: float | None, split_seed: int):
    """The data with ``fraction`` of its training examples moved to the validation set (none
    moved when fraction is None). Normalisation constants stay the dataset's: two numbers per
    channel computed over the whole training split, not refitted per held-out part."""
    if not fraction:
        return data
    if getattr(data, "val_x", None) is not None:
        raise DataError(f"data.val_split: {fraction}, but this dataset brings its own validation split "
                        "(leave data.val_split unset)")
    kept, held = validation_indices(len(data.train_y), fraction, split_seed)
    return replace(data, train_x=data.train_x[kept], train_y=data.train_y[kept],
                   val_x=data.train_x[held], val_y=data.train_y[held])


def data_root(cfg) -> str | None:
    """data.root, or the dataset's default folder (None: the reader picks its own)."""
    from abexp.registry import DATASETS

    return cfg.data.root or DATASETS.get(cfg.data.name).default_root


def has_validation(cfg) -> bool:
    """Whether a run evaluates a validation set: data.val_split holds one out, or its dataset
    brings its own (shakespeare's validation works)."""
    from abexp.registry import DATASETS

    record = DATASETS.find(cfg.data.name)
    return bool(cfg.data.val_split) or bool(record is not None and record.validation)


def lower_is_better(cfg) -> bool:
    """Whether a run's dataset is judged by a loss (a language model), not by accuracy."""
    from abexp.registry import DATASETS

    record = DATASETS.find(cfg.data.name)
    return bool(record is not None and record.lower_is_better)
