"""The built-in datasets, one record each (abexp.registry.DatasetRecord): loader, preflight,
training examples of the full train split (for planning without loading it), classes, default
folder and input kind. The readers are imported when a run loads its data, not before: this
module is read whenever a config is validated."""

from __future__ import annotations

from pathlib import Path

from abexp.registry import DATASETS, DatasetRecord


def _cifar10(cfg):
    from abexp.data.common import data_root
    from abexp.data.images import load_cifar10
    return load_cifar10(data_root(cfg), cfg.data.download)


def _cifar10_preflight(cfg) -> None:
    from abexp.data.common import DataError, data_root
    from abexp.data.images import cifar10_folder
    if cfg.data.download:
        return
    folder = cifar10_folder(data_root(cfg))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if not (folder / name).is_file():
            raise DataError(f"data.root: CIFAR-10 not found: {folder / name} is missing (point "
                            "data.root at a local copy of cifar-10-batches-py, or set "
                            "data.download: true)")


def _idx(cfg):
    from abexp.data.idx import load_idx_dataset
    return load_idx_dataset(cfg.data.name, cfg.data.root, cfg.data.download)


def _idx_preflight(cfg) -> None:
    from abexp.data.idx import read_arrays
    read_arrays(cfg.data.name, cfg.data.root, cfg.data.download)


def _digits(cfg):
    from abexp.data.images import load_digits
    return load_digits(cfg.data.split_seed)


def _synthetic(cfg):
    from abexp.data.images import make_synthetic
    return make_synthetic(cfg.data.synthetic_size, seed=cfg.data.split_seed)


def _imagenet(cfg):
    from abexp.data.common import DataError
    raise DataError(f"data.name={cfg.data.name} is not an in-memory dataset")


def _imagenet_preflight(cfg) -> None:
    from abexp.data.common import data_root
    from abexp.data.imagenet import check_image_folder
    check_image_folder(Path(data_root(cfg)))


DATASETS.add("cifar10", DatasetRecord(_cifar10, 10, 50_000, _cifar10_preflight, default_root="data/cifar10"))
# digits: 1,797 images less the 20% test split
DATASETS.add("digits", DatasetRecord(_digits, 10, 1_438))
DATASETS.add("synthetic", DatasetRecord(_synthetic, 10, lambda cfg: cfg.data.synthetic_size))
# ImageNet: the ILSVRC-2012 train set, read from train/ val/ folders by a DataLoader
DATASETS.add("imagenet", DatasetRecord(_imagenet, 1000, 1_281_167, _imagenet_preflight,
                                       default_root="data/imagenet", input_kind="image_folder"))
# the IDX reader picks its own default folder (the Debian package's, else data/<name>)
DATASETS.add("fashion_mnist", DatasetRecord(_idx, 10, 60_000, _idx_preflight))
DATASETS.add("mnist", DatasetRecord(_idx, 10, 60_000, _idx_preflight))


def _shakespeare(cfg):
    from abexp.data.shakespeare import as_tensor_data
    return as_tensor_data(cfg)


def _shakespeare_preflight(cfg) -> None:
    from abexp.data.common import data_root
    from abexp.data.shakespeare import read_works
    read_works(data_root(cfg))


# characters of the works, split by whole works (docs/language_model.md); classes: the
# vocabulary, known once read; its own validation works, so no data.val_split
DATASETS.add("shakespeare", DatasetRecord(_shakespeare, None, lambda cfg: 4_346_140 // cfg.data.context,
                                          _shakespeare_preflight, task="language_model",
                                          default_root="data/shakespeare", input_kind="tokens",
                                          validation=True))
