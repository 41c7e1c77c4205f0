"""Fashion-MNIST / MNIST: the IDX reader on files the tests write in the official format, each
malformed case as one clear error before any worker starts, the download path, the real Debian
files where installed, and 1-channel training (plain and packed)."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abexp.data import images as D
from abexp.data import load
from abexp.data import idx as M
from abexp.cli import main
from abexp.config import load_config
from abexp.train.packed import PackedRun
from abexp.train.run import Run
from abexp.train.start import train_run
from conftest import idx_bytes, write_idx_dataset

TRAIN_IMAGES = "train-images-idx3-ubyte"


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "decompressed"])
def test_reader_returns_exactly_the_written_arrays(tmp_path, gz):
    written = write_idx_dataset(tmp_path, gz=gz)
    ds = M.load_idx_dataset("fashion_mnist", str(tmp_path))
    assert ds.train_x.shape == (64, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert np.array_equal(ds.train_x[:, 0].numpy(), written[TRAIN_IMAGES])
    assert np.array_equal(ds.train_y.numpy(), written["train-labels-idx1-ubyte"].astype(np.int64))
    assert np.array_equal(ds.test_x[:, 0].numpy(), written["t10k-images-idx3-ubyte"])
    assert np.array_equal(ds.test_y.numpy(), written["t10k-labels-idx1-ubyte"].astype(np.int64))
    pixels = written[TRAIN_IMAGES].astype(np.float64) / 255
    assert ds.mean == pytest.approx((pixels.mean(),)) and ds.std == pytest.approx((pixels.std(),))
    assert ds.channels == 1 and ds.crop_pad == 2 and ds.flip


def test_mnist_digits_are_not_flipped(tmp_path):
    write_idx_dataset(tmp_path)
    assert not M.load_idx_dataset("mnist", str(tmp_path)).flip  # a mirrored 2 is not a 2
    cfg = load_config(None, ["data.name=mnist", f"data.root={tmp_path}", "model.name=resnet8",
                             "data.flip=true", "data.crop_pad=0"])
    ds = load.load_dataset(cfg)
    assert ds.flip and ds.crop_pad == 0  # the config overrides the dataset's choice


def test_crop_without_flip_matches_a_per_sample_reference():
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    out = D.random_crop_flip(x, torch.Generator().manual_seed(3), pad=2, flip=False)
    gen = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 5, (16,), generator=gen), torch.randint(0, 5, (16,), generator=gen)
    for i in range(16):
        assert torch.equal(out[i], F.pad(x[i], (2, 2, 2, 2))[:, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28])
    assert (dy != 2).any()  # some images really moved


def _rewrite(path: Path, blob: bytes, compress: bool = True) -> None:
    path.write_bytes(gzip.compress(blob) if compress else blob)


def _damage(root: Path, case: str) -> Path:
    """Damage one file of a written dataset; return the file an error must name."""
    images = root / f"{TRAIN_IMAGES}.gz"
    labels = root / "train-labels-idx1-ubyte.gz"
    if case == "missing file":
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
        return root / "t10k-labels-idx1-ubyte.gz"
    if case == "wrong magic":  # a labels file where the images belong
        _rewrite(images, gzip.decompress(labels.read_bytes()))
        return images
    if case == "truncated gzip":
        blob = images.read_bytes()
        images.write_bytes(blob[: len(blob) // 2])
        return images
    if case == "truncated content":
        _rewrite(images, gzip.decompress(images.read_bytes())[:-100])
        return images
    if case == "trailing bytes":
        _rewrite(images, gzip.decompress(images.read_bytes()) + b"\0" * 7)
        return images
    if case == "count mismatch":
        _rewrite(labels, idx_bytes(np.zeros(63, dtype=np.uint8)))
        return labels
    if case == "label out of range":
        _rewrite(labels, idx_bytes(np.full(64, 12, dtype=np.uint8)))
        return labels
    raise ValueError(case)


DAMAGES = ["missing file", "wrong magic", "truncated gzip", "truncated content", "trailing bytes",
           "count mismatch", "label out of range"]


@pytest.mark.parametrize("case", DAMAGES)
def test_damaged_files_are_one_error_naming_the_file(tmp_path, case):
    write_idx_dataset(tmp_path)
    bad = _damage(tmp_path, case)
    with pytest.raises(D.DataError) as err:
        M.load_idx_dataset("fashion_mnist", str(tmp_path))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["missing file", "wrong magic", "truncated gzip", "count mismatch"])
def test_run_refuses_damaged_data_before_any_worker_starts(tmp_path, capsys, case):
    data = tmp_path / "fm"
    write_idx_dataset(data)
    bad = _damage(data, case)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: fm\nbase: {{model: {{name: resnet8}}, data: {{name: fashion_mnist, root: {data}}}}}\n"
                    "grid: {seed: [0, 1]}\n")
    results = tmp_path / "results"
    assert main(["run", str(spec), "--results", str(results), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err
    assert not results.exists()  # nothing half-written
    out, cfg = tmp_path / "single", tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{name: fashion_mnist, root: {data}}}\nmodel: {{name: resnet8}}\n")
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    assert str(bad) in capsys.readouterr().err and not out.exists()


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(D.DataError, match=r"data\.root: fashion_mnist not found.*apt-get install dataset-fashion-mnist"):
        M.load_idx_dataset("fashion_mnist", str(tmp_path / "nowhere"))


def _serve(tmp_path, monkeypatch, name="fashion_mnist"):
    """A local 'upstream' folder; SOURCES points at it with the content checksums of its files."""
    server = tmp_path / "server"
    written = write_idx_dataset(server)
    sums = {stem: hashlib.sha256(idx_bytes(a)).hexdigest() for stem, a in written.items()}
    monkeypatch.setitem(M.SOURCES, name, {**M.SOURCES[name], "url": server.as_uri() + "/", "sha256": sums})
    return server, written


def test_download_fetches_and_verifies_content_checksums(tmp_path, monkeypatch):
    _, written = _serve(tmp_path, monkeypatch)
    ds = M.load_idx_dataset("fashion_mnist", str(tmp_path / "dl"), fetch=True)
    assert np.array_equal(ds.train_x[:, 0].numpy(), written[TRAIN_IMAGES])
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(f"{s}.gz" for s in M.FILES)


def test_download_with_a_bad_checksum_fails_and_leaves_nothing(tmp_path, monkeypatch):
    server, _ = _serve(tmp_path, monkeypatch)
    _rewrite(server / f"{TRAIN_IMAGES}.gz", idx_bytes(np.zeros((64, 28, 28), dtype=np.uint8)))
    with pytest.raises(D.DataError, match=f"{TRAIN_IMAGES}.gz: the downloaded file fails its checksum"):
        M.load_idx_dataset("fashion_mnist", str(tmp_path / "dl"), fetch=True)
    assert not (tmp_path / "dl" / f"{TRAIN_IMAGES}.gz").exists()
    assert not list((tmp_path / "dl").glob("*.part"))


def test_mnist_download_checks_the_gz_md5(tmp_path, monkeypatch):
    server, _ = _serve(tmp_path, monkeypatch, "mnist")
    md5 = {s: hashlib.md5((server / f"{s}.gz").read_bytes()).hexdigest() for s in M.FILES}
    monkeypatch.setitem(M.SOURCES, "mnist", {**M.SOURCES["mnist"], "sha256": {}, "md5_gz": md5})
    assert len(M.load_idx_dataset("mnist", str(tmp_path / "ok"), fetch=True).train_y) == 64
    md5[TRAIN_IMAGES] = "0" * 32
    with pytest.raises(D.DataError, match="fails its checksum"):
        M.load_idx_dataset("mnist", str(tmp_path / "bad"), fetch=True)


@pytest.mark.skipif(not M.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (make setup / .ci/run install it)")
def test_the_real_debian_files_load_and_match_the_official_content():
    ds = M.load_idx_dataset("fashion_mnist")  # default root: checked against the content sha256s
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [6000] * 10 and ds.test_y.bincount().tolist() == [1000] * 10
    assert ds.mean[0] == pytest.approx(72.94 / 255, abs=1e-3)  # the dataset's published pixel mean


def test_one_channel_run_trains_and_resumes_bitwise(tmp_path):
    write_idx_dataset(tmp_path / "fm", n_train=96)
    cfg = load_config(None, ["data.name=fashion_mnist", f"data.root={tmp_path / 'fm'}", "model.name=resnet8",
                             "train.batch_size=32", "train.epochs=2", "optim.name=ab", "delay.steps=2",
                             "schedule.name=constant", "eval.bn=recalibrate", "eval.recal_batches=2"])
    run = Run(cfg, tmp_path / "a", "cpu", log=lambda s: None)
    assert run.model.conv.weight.shape == (16, 1, 3, 3)
    whole = train_run(cfg, tmp_path / "a", "cpu", log=lambda s: None)
    assert whole["status"] == "completed" and whole["steps"] == 6
    assert whole["test_acc_running_bn"] is not None  # the last epoch also reports running-BN accuracy
    assert train_run(cfg, tmp_path / "b", "cpu", stop_after_epochs=1, log=lambda s: None) is None
    resumed = train_run(cfg, tmp_path / "b", "cpu", log=lambda s: None)
    assert resumed["test_acc"] == whole["test_acc"] and resumed["train_loss"] == whole["train_loss"]


def test_one_channel_packed_step_equals_separate_steps(tmp_path):
    write_idx_dataset(tmp_path / "fm")
    base = ["data.name=fashion_mnist", f"data.root={tmp_path / 'fm'}", "model.name=resnet8",
            "train.batch_size=16", "schedule.name=constant"]
    cfgs = [load_config(None, base + r) for r in (["seed=0", "optim.name=sgdm"],
                                                  ["seed=1", "optim.name=ab", "delay.steps=2"])]
    pack = PackedRun(cfgs, [tmp_path / "p0", tmp_path / "p1"], "cpu", log=lambda s: None)
    batches = [next(iter(b.epoch(0))) for b in pack.batches]
    pack.train_step([b[0] for b in batches], [b[1] for b in batches], [c.optim.lr for c in cfgs])
    for cfg, (x, y), engine in zip(cfgs, batches, pack.engines):
        single = Run(cfg, tmp_path / "s", "cpu", log=lambda s: None)
        single.train_step(x, y, cfg.optim.lr)
        assert float((engine.w - single.engine.w).norm() / single.engine.w.norm()) < 1e-6
