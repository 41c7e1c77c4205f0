"""MNIST-format (IDX) datasets: Fashion-MNIST and the original MNIST, read into ImageData.

The four files of either dataset are IDX arrays (big-endian header: two zero bytes, a type code,
the number of dimensions, one 32-bit size per dimension, then the raw bytes), usually gzipped.
Fashion-MNIST ships offline as Debian's ``dataset-fashion-mnist`` package; Debian re-gzipped the
files, so the *decompressed content* is what is checksummed, never the .gz bytes.

Every problem (missing file, wrong magic number, truncated file, image and label counts that
disagree) is a DataError naming the file, raised when the data is loaded or pre-flighted.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from abexp.data.common import DataError, ImageData

SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FILES = [name for pair in SPLITS.values() for name in pair]
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # ubyte, 3 dims / ubyte, 1 dim

# Where Debian's dataset-fashion-mnist puts the files; the default data.root for fashion_mnist.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

SOURCES = {
    # sha256 of each file's decompressed content (computed from the Debian package, whose
    # contents are upstream's)
    "fashion_mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "sha256": {
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        "hint": "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or set data.download: true",
    },
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "sha256": {},  # content hashes not known offline: the download checks the .gz MD5s instead
        "md5_gz": {"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                   "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
                   "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                   "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"},
        "hint": "point data.root at a folder with the four IDX files, or set data.download: true",
    },
}
# Grayscale, 28x28: crop after 2 pixels of padding (the items are centred with a ~2-pixel margin).
CROP_PAD = 2


def default_root(name: str) -> Path:
    """fashion_mnist: the Debian package's folder where installed; otherwise data/<name>."""
    if name == "fashion_mnist" and DEBIAN_FASHION_MNIST.is_dir():
        return DEBIAN_FASHION_MNIST
    return Path("data") / name


def locate(root: Path, stem: str) -> Path:
    """``stem.gz`` or the decompressed ``stem`` inside root."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / (stem + '.gz')}: missing")


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is gzip (told by its magic bytes, not its name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as err:  # truncated or corrupt gzip, unreadable file
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from None


def parse_idx(blob: bytes, path: Path, magic: int) -> np.ndarray:
    """An IDX byte array, checked: its magic number, and a length that matches its header."""
    if len(blob) < 4:
        raise DataError(f"{path}: truncated ({len(blob)} bytes, no IDX header)")
    found = struct.unpack(">I", blob[:4])[0]
    if found != magic:
        raise DataError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} "
                        f"({'images' if magic == IMAGES_MAGIC else 'labels'})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", blob[4:header])
    expected = header + int(np.prod(dims))
    if len(blob) != expected:
        what = "truncated" if len(blob) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what} ({len(blob)} bytes, header {list(dims)} needs {expected})")
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)


def read_split(root: Path, split: str, checksums: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = SPLITS[split]
    arrays = []
    for stem, magic in ((images_stem, IMAGES_MAGIC), (labels_stem, LABELS_MAGIC)):
        path = locate(root, stem)
        blob = read_bytes(path)
        arrays.append(parse_idx(blob, path, magic))
        if stem in checksums and hashlib.sha256(blob).hexdigest() != checksums[stem]:
            raise DataError(f"{path}: content checksum differs from the official file's")
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{locate(root, labels_stem)}: {len(labels)} labels for {len(images)} images "
                        f"in {locate(root, images_stem).name}")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{locate(root, labels_stem)}: label {int(labels.max())} outside 0..9")
    return images, labels


def download(name: str, root: Path) -> None:
    """Fetch the four official files into root (each written whole or not at all)."""
    source = SOURCES[name]
    root.mkdir(parents=True, exist_ok=True)
    for stem in FILES:
        target = root / f"{stem}.gz"
        if target.exists():
            continue
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".part")
        os.close(fd)
        try:
            urllib.request.urlretrieve(source["url"] + target.name, tmp)
            blob = read_bytes(Path(tmp))
            good = (hashlib.sha256(blob).hexdigest() == source["sha256"][stem] if source["sha256"]
                    else hashlib.md5(Path(tmp).read_bytes()).hexdigest() == source["md5_gz"][stem])
            if not good:
                raise DataError(f"{target}: the downloaded file fails its checksum")
            os.replace(tmp, target)
        except OSError as err:
            raise DataError(f"{target}: absent and download failed ({err})") from None
        finally:
            Path(tmp).unlink(missing_ok=True)


def resolve_root(name: str, root: str | None, fetch: bool) -> Path:
    """The folder to read: data.root or the default, downloaded into first when asked."""
    folder = Path(root) if root else default_root(name)
    missing = [s for s in FILES if not (folder / f"{s}.gz").is_file() and not (folder / s).is_file()]
    if missing and fetch:
        download(name, folder)
    elif missing:
        raise DataError(f"data.root: {name} not found: {folder / (missing[0] + '.gz')} is missing "
                        f"({SOURCES[name]['hint']})")
    return folder


def read_arrays(name: str, root: str | None = None, fetch: bool = False) -> dict[str, np.ndarray]:
    """All four arrays, checked. The official files (the default root, a download) are also
    checked against their content checksums; a user's own data.root is not (tests, subsets)."""
    folder = resolve_root(name, root, fetch)
    checksums = SOURCES[name]["sha256"] if root is None else {}
    train_x, train_y = read_split(folder, "train", checksums)
    test_x, test_y = read_split(folder, "test", checksums)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def load_idx_dataset(name: str, root: str | None = None, fetch: bool = False) -> ImageData:
    """The 60k/10k split as uint8 [N, 1, 28, 28], normalised by the training set's statistics."""
    a = read_arrays(name, root, fetch)
    train_x, train_y, test_x, test_y = a["train_x"], a["train_y"], a["test_x"], a["test_y"]
    pixels = train_x.astype(np.float64) / 255.0
    mean, std = (float(pixels.mean()),), (float(pixels.std()),)
    as_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # noqa: E731
    as_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return ImageData(as_images(train_x), as_labels(train_y), as_images(test_x), as_labels(test_y),
                     mean, std, crop_pad=CROP_PAD, flip=(name == "fashion_mnist"))
