"""Shared test setup: no network for W&B, few threads, tiny data in real on-disk formats."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)


def write_cifar10_batches(root: Path, n_per_batch: int = 20, n_test: int = 30, seed: int = 0) -> dict:
    """Write the official cifar-10-batches-py layout (pickled dicts with bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else n_per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        written[name] = (data, labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    return written


@pytest.fixture
def tiny_cifar(tmp_path) -> tuple[Path, dict]:
    return tmp_path, write_cifar10_batches(tmp_path)


TINY = ["data.name=digits", "model.name=resnet8", "train.batch_size=32", "data.subset=256",
        "data.test_subset=128", "optim.lr=0.05", "schedule.name=constant"]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A run that takes about a second per epoch on 2 CPU cores."""
    return list(TINY)
