import hashlib
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abexp.data import images as D
from abexp.data import load
from conftest import write_cifar10_batches


def test_cifar_reader_reads_the_official_layout(tiny_cifar):
    root, written = tiny_cifar
    ds = D.load_cifar10(root)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    expect_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(ds.train_x.reshape(100, -1).numpy(), expect_train)
    assert ds.train_y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert np.array_equal(ds.test_x.reshape(30, -1).numpy(), written["test_batch"][0])
    # a pixel: row-major 32x32 per channel, red plane first (the official format)
    assert int(ds.train_x[0, 1, 2, 3]) == int(expect_train[0, 1024 + 2 * 32 + 3])


def test_cifar_reader_accepts_the_inner_folder(tiny_cifar):
    root, _ = tiny_cifar
    assert len(D.load_cifar10(root / "cifar-10-batches-py").train_y) == 100


def test_cifar_absent_offline_names_the_expected_path(tmp_path):
    with pytest.raises(D.DataError, match=r"data\.root.*cifar-10-batches-py"):
        D.load_cifar10(tmp_path / "nowhere")


def test_cifar_truncated_batch_is_a_clear_error(tiny_cifar):
    root, _ = tiny_cifar
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.load_cifar10(root)


def make_archive(tmp_path):
    src = tmp_path / "src"
    write_cifar10_batches(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_download_verifies_md5_and_extracts(tmp_path, monkeypatch):
    archive = make_archive(tmp_path)
    monkeypatch.setattr(D, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(D, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    ds = D.load_cifar10(tmp_path / "dl", download=True)
    assert len(ds.train_y) == 100 and (tmp_path / "dl" / "cifar-10-batches-py" / "test_batch").exists()


def test_download_with_wrong_md5_fails_and_leaves_nothing(tmp_path, monkeypatch):
    archive = make_archive(tmp_path)
    monkeypatch.setattr(D, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(D, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(D.DataError, match="MD5"):
        D.load_cifar10(tmp_path / "dl", download=True)
    assert list((tmp_path / "dl").iterdir()) == []


def test_digits_shapes_and_fixed_split():
    from sklearn.datasets import load_digits
    a, b = D.load_digits(0), D.load_digits(0)
    assert a.train_x.shape[1:] == (3, 32, 32) and a.train_x.dtype == torch.uint8
    assert len(a.train_y) + len(a.test_y) == 1797 and len(a.test_y) == 359
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(D.load_digits(1).test_y, a.test_y)
    # each 8x8 pixel becomes a 4x4 block in every channel; train and test are disjoint
    sk = load_digits()
    flat_sk = {tuple((img * 255 / 16).round().astype(np.uint8).ravel()) for img in sk.images}
    down = a.train_x[:, 0, ::4, ::4].reshape(len(a.train_y), -1).numpy()
    assert all(tuple(row) in flat_sk for row in down[:50])
    assert torch.equal(a.train_x[:, 0], a.train_x[:, 2])
    train_set = {r.tobytes() for r in a.train_x.reshape(len(a.train_y), -1).numpy()}
    dup_free_test = [r.tobytes() for r in a.test_x.reshape(len(a.test_y), -1).numpy()]
    assert sum(r in train_set for r in dup_free_test) < 5  # digits has a few exact duplicate images


def test_batched_crop_flip_matches_a_per_sample_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = D.random_crop_flip(x, gen)
    # replay the same draws and crop each image with plain slicing
    gen = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 9, (16,), generator=gen)
    dx = torch.randint(0, 9, (16,), generator=gen)
    flip = torch.rand(16, generator=gen) < 0.5
    for i in range(16):
        ref = F.pad(x[i], (4, 4, 4, 4))[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    assert flip.any() and not flip.all()


def test_epoch_order_is_seeded_per_epoch():
    ds = D.make_synthetic(64)
    b1, b2 = D.Batches(ds, 16, True, seed=1), D.Batches(ds, 16, True, seed=1)
    e0 = [y for _, y in b1.epoch(0)]
    assert all(torch.equal(u, v) for u, v in zip(e0, [y for _, y in b2.epoch(0)]))
    assert not all(torch.equal(u, v) for u, v in zip(e0, [y for _, y in b1.epoch(1)]))
    assert sorted(torch.cat(e0).tolist()) == sorted(ds.train_y.tolist())  # a permutation


def test_subset_takes_n_examples():
    ds = D.take_subset(D.load_digits(), 100, 50, seed=0)
    assert len(ds.train_y) == 100 and len(ds.test_y) == 50
