"""Shared test setup: no network for W&B, few threads, tiny data in real on-disk formats."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from abexp.process_env import init_process_env  # noqa: E402

init_process_env()  # as every abexp entry point does: tests/test_gpu.py builds deterministic runs
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


def drive(engine, model, flat, data, lr):
    """Train a DelayedSGD ``engine`` on ``data``: each step's gradient on ``model`` (whose
    parameters are the views ``flat``) at the engine's forward weights."""
    import torch.nn.functional as F
    for x, y in data:
        def grad_fn(w_fwd):
            flat.data.copy_(w_fwd)
            flat.grad.zero_()
            F.cross_entropy(model(x), y).backward()
            return flat.grad
        engine.step(grad_fn, lr)
    return engine.w


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format, written from its definition: 0, 0, type 0x08 (ubyte), ndim, then one
    big-endian uint32 per dimension and the raw bytes."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(np.uint8).tobytes()


def write_idx_dataset(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0,
                      gz: bool = True) -> dict[str, np.ndarray]:
    """The four (Fashion-)MNIST files in the official layout, with random 28x28 images."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8)}
    for stem, array in arrays.items():
        if gz:
            with gzip.open(root / f"{stem}.gz", "wb") as fh:
                fh.write(idx_bytes(array))
        else:
            (root / stem).write_bytes(idx_bytes(array))
    return arrays


@pytest.fixture
def tiny_cifar(tmp_path) -> tuple[Path, dict]:
    return tmp_path, write_cifar10_batches(tmp_path)


TINY = ["data.name=digits", "model.name=resnet8", "train.batch_size=32", "data.subset=256",
        "data.test_subset=128", "optim.lr=0.05", "schedule.name=constant"]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A run that takes about a second per epoch on 2 CPU cores."""
    return list(TINY)


def collected_columns(config) -> dict:
    """A run config's columns as abexp.lab.collect writes them (dotted keys, lists as JSON)."""
    import json

    from abexp.config import flatten
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(config.model_dump()).items()}


def runs_table(cells: dict, path) -> None:
    """A hand-made results table at ``path`` (CSV): ``cells`` maps (optimizer, delay, lr) to
    per-seed (val_acc, test_acc) pairs, a None pair being a diverged seed."""
    import pandas as pd
    rows = [{"run_id": f"r{i}_{s}", "experiment": "e", "status": "diverged" if v is None else "completed",
             "val_acc": v, "test_acc": t, "optim.name": o, "delay.steps": d, "optim.lr": lr, "seed": s,
             "delay.kind": "constant"}
            for i, ((o, d, lr), pairs) in enumerate(cells.items()) for s, (v, t) in enumerate(pairs)]
    pd.DataFrame(rows).to_csv(path, index=False)


@pytest.fixture(autouse=True)
def plugins_isolated():
    """Each test starts and ends with the same plugins loaded: a plugin one test loads into
    this process (abexp.registry) must not reach the next test's subprocesses through
    ABEXP_PLUGINS, nor its entries the next test's registries. The built-in entries are
    loaded first (their modules register once per process), then restored with the rest."""
    import sys

    from abexp import registry
    from abexp.lab import backends

    env = os.environ.pop(registry.ENV, None)
    registry.load_plugins()  # the built-ins (and any plugin already loaded in this process)
    if env is not None:
        os.environ[registry.ENV] = env
    tables = (registry.RULES, registry.MODELS, registry.DATASETS, registry.FIGURES)
    saved = [(table, dict(table._records)) for table in tables]
    loaded, saved_backends = dict(registry._loaded), dict(backends.BACKENDS)
    yield
    new_tops = {m.split(".")[0] for m in registry._loaded if m not in loaded}
    for table, records in saved:
        table._records.clear()
        table._records.update(records)
    registry._loaded.clear()
    registry._loaded.update(loaded)
    backends.BACKENDS.clear()
    backends.BACKENDS.update(saved_backends)
    if env is None:
        os.environ.pop(registry.ENV, None)
    else:
        os.environ[registry.ENV] = env
    for name in [m for m in sys.modules if m.split(".")[0] in new_tops]:
        del sys.modules[name]  # a later test's load imports it afresh, and it registers again
