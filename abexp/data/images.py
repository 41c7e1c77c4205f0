"""In-memory image datasets on the run's device, with batched on-device augmentation.

As in airbench, the whole dataset lives on the device as uint8 and there is no DataLoader:
a batch is an index gather, a random crop and a flip done for the whole batch at once. Data
order and augmentation of epoch e depend only on (seed, e), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from abexp.data.common import DataError, ImageData, TensorData
from abexp.seeds import epoch_seed

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Batches:
    """Seeded, augmented mini-batches over an in-memory ImageData or TensorData (drop_last:
    fixed batch size). TensorData is augmented only by its own ``augment`` function, if any."""

    def __init__(self, data: ImageData | TensorData, batch_size: int, augment: bool, seed: int):
        if len(data.train_y) < batch_size:
            raise DataError(f"{len(data.train_y)} training examples < batch size {batch_size}")
        if isinstance(data, TensorData):
            augment = augment and data.augment is not None
        self.data, self.batch_size, self.augment, self.seed = data, batch_size, augment, seed
        self.steps_per_epoch = len(data.train_y) // batch_size
        self.num_classes, self.channels = data.num_classes, data.channels
        self.input_shape = tuple(data.train_x.shape[1:])

    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        gen = torch.Generator(device=self.data.train_x.device)
        gen.manual_seed(epoch_seed(self.seed, epoch, stream))
        return gen

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = self._generator(epoch, 0)
        device = self.data.train_x.device
        order = torch.randperm(len(self.data.train_y), generator=gen, device=device)
        for i in range(self.steps_per_epoch):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.data.train_x[idx]
            if self.augment and isinstance(self.data, TensorData):
                x = self.data.augment(x, gen)
            elif self.augment:
                x = random_crop_flip(x, gen, self.data.crop_pad, self.data.flip)
            yield self.data.normalize(x), self.data.train_y[idx]

    def plain(self, n_batches: int) -> Iterator[torch.Tensor]:
        """Un-augmented training images (for BN recalibration), a fixed seeded draw."""
        gen = self._generator(-1, 1)
        order = torch.randperm(len(self.data.train_y), generator=gen, device=self.data.train_x.device)
        for i in range(min(n_batches, self.steps_per_epoch)):
            yield self.data.normalize(self.data.train_x[order[i * self.batch_size:(i + 1) * self.batch_size]])

    def test(self, batch_size: int, split: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test set, or (``split="val"``) the examples held out of training, un-augmented."""
        xs, ys = (self.data.test_x, self.data.test_y) if split == "test" else (self.data.val_x, self.data.val_y)
        if ys is None:
            raise ValueError(f"no {split} set (data.val_split is not set)")
        for i in range(0, len(ys), batch_size):
            yield self.data.normalize(xs[i:i + batch_size]), ys[i:i + batch_size]


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True
                     ) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and (``flip``) a random horizontal flip, for a
    whole batch."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    if flip:
        mirrored = torch.rand(b, generator=gen, device=x.device) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


# ---------------------------------------------------------------- CIFAR-10 (official pickles)

def cifar10_folder(root: str | Path) -> Path:
    """The folder with data_batch_1..5 and test_batch: ``root`` itself or root/cifar-10-batches-py."""
    root = Path(root)
    return root if (root / "data_batch_1").exists() else root / CIFAR10_DIR


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")  # the official format is a pickle
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (expected the official cifar-10-batches-py layout)") from None
    except Exception as err:  # truncated file, wrong format
        raise DataError(f"{path}: not a CIFAR-10 batch ({type(err).__name__}: {err})") from None
    if len(data) != len(labels):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def download_cifar10(root: str | Path) -> Path:
    """Fetch the official archive, verify its MD5, extract atomically into root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        try:
            urllib.request.urlretrieve(CIFAR10_URL, archive)
        except OSError as err:
            raise DataError(f"{root / CIFAR10_DIR}: absent and download failed ({err})") from None
        md5 = hashlib.md5(archive.read_bytes()).hexdigest()
        if md5 != CIFAR10_MD5:
            raise DataError(f"{archive.name}: MD5 {md5} != expected {CIFAR10_MD5}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        target = root / CIFAR10_DIR
        if not target.exists():
            os.replace(Path(tmp) / CIFAR10_DIR, target)
    return root / CIFAR10_DIR


def load_cifar10(root: str | Path, download: bool = False) -> ImageData:
    folder = cifar10_folder(root)
    if not (folder / "data_batch_1").exists():
        if not download:
            raise DataError(f"data.root: CIFAR-10 not found at {Path(root) / CIFAR10_DIR} (expected "
                            "data_batch_1..5 and test_batch there; point data.root at a local copy, "
                            "or set data.download: true)")
        folder = download_cifar10(root)
    parts = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return ImageData(torch.from_numpy(train_x), torch.from_numpy(train_y),
                     torch.from_numpy(test_x), torch.from_numpy(test_y), CIFAR10_MEAN, CIFAR10_STD)


# ---------------------------------------------------------------- digits, synthetic

def load_digits(split_seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8x8 digits as 3x32x32 uint8 (nearest upsampling), a fixed split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8))
    images = images[:, None].repeat_interleave(4, 2).repeat_interleave(4, 3).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    x = images[train].float() / 255.0
    mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in x.std(dim=(0, 2, 3)))
    return ImageData(images[train], labels[train], images[test], labels[test], mean, std)


def make_synthetic(n_train: int, seed: int = 0, num_classes: int = 10) -> ImageData:
    """Random CIFAR-shaped data: for throughput benchmarks, not for accuracy."""
    gen = torch.Generator().manual_seed(seed)
    n_test = max(1, n_train // 5)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=gen)
    return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], (0.5,) * 3, (0.29,) * 3)


def take_subset(data, n_train: int | None, n_test: int | None, seed: int):
    """The first N examples of a fixed shuffle, so a subset is a fair sample of the classes."""
    def pick(x: torch.Tensor, y: torch.Tensor, n: int | None, stream: int):
        if n is None or n >= len(y):
            return x, y
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + stream))[:n]
        return x[order], y[order]
    train_x, train_y = pick(data.train_x, data.train_y, n_train, 0)
    test_x, test_y = pick(data.test_x, data.test_y, n_test, 1)
    return replace(data, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
