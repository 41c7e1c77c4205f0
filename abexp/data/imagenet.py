"""ImageNet-style data: an ImageFolder tree (train/, val/, one folder per class) through a
multi-worker DataLoader with pinned memory; too large to keep on the device like CIFAR.

Augmentation is the standard one: RandomResizedCrop + horizontal flip for training; resize to
256/224 of the crop size and a centre crop for validation. Data order and augmentation of
epoch e depend only on (seed, e): the order is a seeded permutation, and each training image's
crop is drawn from a seed of (seed, e, its index), so it does not depend on which worker loads
it or what that worker loaded before. Under DDP every rank loads only its share of each global
batch.

One DataLoader serves training, BN recalibration and evaluation, with persistent workers: a
rank forks its ``data.workers`` processes once, not at every epoch, evaluation and
recalibration (ImageNet's 12 per rank used to be forked three times an epoch).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

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


TRAIN, PLAIN, VAL = 0, 1, 2  # the three uses of a rank's images, one loader for all
GOLDEN = 0x9E3779B97F4A7C15  # spreads an image's index over the 63-bit seed space


def crop_seed(epoch_base: int, index: int) -> int:
    """The seed of one training image's augmentation in an epoch (``epoch_base`` is the epoch's)."""
    return (epoch_base + (index + 1) * GOLDEN) & ((1 << 63) - 1)


class _Images(torch.utils.data.Dataset):
    """Training crops, plain training images and validation images as one dataset, so one set of
    persistent workers serves all three. A key is (use, index, seed): with a seed, the image's
    transform draws from it alone (the caller's RNG is left as it was: with no workers, this
    runs in the training process)."""

    def __init__(self, train, plain, val):
        self.uses = (train, plain, val)

    def __len__(self) -> int:
        return sum(len(u) for u in self.uses)

    def __getitem__(self, key: tuple[int, int, int | None]):
        use, index, seed = key
        if seed is None:
            return self.uses[use][index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.uses[use][index]


class _Pass(torch.utils.data.Sampler):
    """The batches of the loader's next pass, set before each pass: lists of _Images keys."""

    def __init__(self):
        self.batches: list | Iterator = []
        self.steps = 0

    def set(self, batches, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return self.steps


def _shares(order: torch.Tensor, batch: int, steps: int, rank: int, world: int, use: int,
            seed: int | None = None) -> Iterator[list]:
    """For each step, this rank's keys of the global batch (a crop seed each with ``seed``)."""
    share = batch // world
    for i in range(steps):
        chunk = order[i * batch:(i + 1) * batch][rank * share:(rank + 1) * share].tolist()
        yield [(use, j, None if seed is None else crop_seed(seed, j)) for j in chunk]


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
        self._loader: DataLoader | None = None

    def loader(self) -> DataLoader:
        """The one DataLoader of this rank, built at first use; its workers live as long as it."""
        if self._loader is None:
            self._pass = _Pass()
            self._loader = DataLoader(
                _Images(self.train, self.train_plain, self.val), batch_sampler=self._pass,
                num_workers=self.workers, pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0,
                generator=torch.Generator().manual_seed(self.seed))  # never draws from the global RNG
        return self._loader

    def _run(self, batches, steps: int) -> Iterator:
        """One pass of the loader over ``batches``, onto the device."""
        loader = self.loader()
        self._pass.set(batches, steps)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch_from(epoch, 0)

    def epoch_from(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch ``epoch``'s batches from step ``start`` on, the earlier ones never loaded (a
        resume mid-epoch): an image's crop depends on (seed, epoch, index) alone."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 0))
        order = self.indices[torch.randperm(len(self.indices), generator=gen)]
        keys = _shares(order, self.batch_size, self.steps_per_epoch, self.rank, self.world, TRAIN,
                       epoch_seed(self.seed, epoch, 2))
        return self._run(itertools.islice(keys, start, None), self.steps_per_epoch - start)

    def plain(self, n_batches: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, -1, 1))
        order = self.indices[torch.randperm(len(self.indices), generator=gen)]
        steps = min(n_batches, self.steps_per_epoch)
        return (x for x, _ in self._run(_shares(order, self.batch_size, steps, self.rank, self.world, PLAIN), steps))

    def test(self, batch_size: int, split: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of ImageNet's val/ folder (abexp's test set), or (``split="val"``)
        of the training images held out by data.val_split, with the same centre-crop transform
        (the caller sums over ranks)."""
        if split == "val" and not len(self.held_out):
            raise ValueError("no val set (data.val_split is not set)")
        use, indices = (VAL, self.val_indices) if split == "test" else (PLAIN, self.held_out)
        mine = indices[self.rank::self.world].tolist()
        batches = [[(use, j, None) for j in mine[i:i + batch_size]] for i in range(0, len(mine), batch_size)]
        return self._run(batches, len(batches))
