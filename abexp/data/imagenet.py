"""ImageNet-style data: an ImageFolder tree (train/, val/, one folder per class) through a
multi-worker DataLoader with pinned memory; too large to keep on the device like CIFAR.

Augmentation is the standard one: RandomResizedCrop + horizontal flip for training; resize to
256/224 of the crop size and a centre crop for validation. Data order and augmentation of
epoch e depend only on (seed, e): the order is a seeded permutation, and the DataLoader's
worker seeds come from a generator seeded per epoch. Under DDP every rank loads only its share
of each global batch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Subset

from abexp.data.common import DataError, data_root, validation_indices
from abexp.seeds import epoch_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def check_image_folder(root: Path) -> list[str]:
    """The class names of root/train, after checking that root/val has the same classes."""
    root = Path(root)
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"data.root: {folder} not found (expected {root}/train/<class>/*.jpg "
                            f"and {root}/val/<class>/*.jpg)")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"data.root: {folder} has no class folders (expected {folder}/<class>/*.jpg)")
        empty = [c for c in classes if not any(f.suffix.lower() in IMAGE_EXTENSIONS
                                               for f in (folder / c).iterdir())]
        if empty:
            raise DataError(f"data.root: {folder / empty[0]} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        if split == "train":
            train_classes = classes
        elif classes != train_classes:
            missing = sorted(set(train_classes) ^ set(classes))
            raise DataError(f"data.root: {folder} classes differ from train/ (e.g. {missing[0]!r})")
    return train_classes


class _Batches(torch.utils.data.Sampler):
    """Yields, for each step of one epoch, this rank's indices of the global batch."""

    def __init__(self, order: torch.Tensor, batch: int, steps: int, rank: int, world: int):
        self.order, self.batch, self.steps, self.rank, self.world = order, batch, steps, rank, world

    def __iter__(self):
        share = self.batch // self.world
        for i in range(self.steps):
            chunk = self.order[i * self.batch:(i + 1) * self.batch]
            yield chunk[self.rank * share:(self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return self.steps


class ImageNetBatches:
    """Same interface as abexp.data.images.Batches: epoch(e), plain(n), test(bs), steps_per_epoch."""

    sharded = True  # batches are already this rank's share

    def __init__(self, cfg, device: torch.device, rank: int = 0, world: int = 1):
        from abexp.tv_compat import import_torchvision

        tv = import_torchvision()
        T, datasets = tv.transforms, tv.datasets
        root, size = Path(data_root(cfg)), cfg.data.image_size
        self.classes = check_image_folder(root)
        self.num_classes, self.channels = len(self.classes), 3
        self.input_shape = (3, size, size)
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
        val_tf = T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), *norm])
        try:
            self.train = datasets.ImageFolder(str(root / "train"), train_tf)
            self.train_plain = copy.copy(self.train)  # same file list, no second directory scan
            self.train_plain.transform = val_tf
            self.val = datasets.ImageFolder(str(root / "val"), val_tf)
        except (FileNotFoundError, OSError) as err:
            raise DataError(f"data.root: {root}: {err}") from None
        self.indices = torch.arange(len(self.train))
        if cfg.data.subset:
            perm = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(cfg.data.split_seed))
            self.indices = perm[:cfg.data.subset]
        self.held_out = torch.arange(0)  # data.val_split: training images evaluated, not trained on
        if cfg.data.val_split:
            kept, held = validation_indices(len(self.indices), cfg.data.val_split, cfg.data.split_seed)
            self.indices, self.held_out = self.indices[kept], self.indices[held]
        self.val_indices = torch.arange(len(self.val))[:cfg.data.test_subset]
        self.batch_size, self.seed, self.device = cfg.train.batch_size, cfg.seed, device
        self.rank, self.world, self.workers = rank, world, cfg.data.workers
        if self.batch_size % world:
            raise DataError(f"train.batch_size {self.batch_size} is not divisible by {world} processes")
        if len(self.indices) < self.batch_size:
            raise DataError(f"data.root: {len(self.indices)} training images < batch size {self.batch_size}")
        self.steps_per_epoch = len(self.indices) // self.batch_size

    def _loader(self, dataset, batch_sampler, epoch: int) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 2)))

    def _to_device(self, batches) -> Iterator:
        for x, y in batches:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 0))
        order = self.indices[torch.randperm(len(self.indices), generator=gen)]
        sampler = _Batches(order, self.batch_size, self.steps_per_epoch, self.rank, self.world)
        return self._to_device(self._loader(self.train, sampler, epoch))

    def plain(self, n_batches: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, -1, 1))
        order = self.indices[torch.randperm(len(self.indices), generator=gen)]
        sampler = _Batches(order, self.batch_size, min(n_batches, self.steps_per_epoch), self.rank, self.world)
        return (x for x, _ in self._to_device(self._loader(self.train_plain, sampler, -1)))

    def test(self, batch_size: int, split: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of ImageNet's val/ folder (abexp's test set), or (``split="val"``)
        of the training images held out by data.val_split, with the same centre-crop transform
        (the caller sums over ranks)."""
        if split == "val" and not len(self.held_out):
            raise ValueError("no val set (data.val_split is not set)")
        dataset, indices = (self.val, self.val_indices) if split == "test" else (self.train_plain, self.held_out)
        mine = indices[self.rank::self.world]
        loader = DataLoader(Subset(dataset, mine.tolist()), batch_size=batch_size,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        return self._to_device(loader)
