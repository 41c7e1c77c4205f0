"""The Shakespeare character data on texts the tests write: the split by whole works, the
training-only vocabulary, step windows against plain slicing and their independence of what ran
before, Gutenberg boilerplate, and each damaged-folder case as one DataError naming the path and
the fix. One test reads the real files (make setup) and is skipped where they are absent."""

from pathlib import Path

import pytest
import torch

from abexp.data import shakespeare as S
from abexp.data.common import DataError

WORKS = {"a_play": "To be, or not.\nABC", "b_play": "xyz xyz\nQ!", "c_poem": "Sonnet ~ one",
         "d_play": "hello world", "e_play": "MORE lines here."}


def test_split_is_by_whole_works_and_the_vocabulary_is_the_training_characters():
    data = S.build(WORKS, val_works=("c_poem",), test_works=("e_play",))
    assert data.train_works == ("a_play", "b_play", "d_play")
    assert data.val_works == ("c_poem",) and data.test_works == ("e_play",)
    train_text = S.SEPARATOR.join(WORKS[w] for w in ("a_play", "b_play", "d_play"))
    assert data.chars == "\0" + "".join(sorted(set(train_text)))
    assert data.decode(data.train) == train_text and data.train.dtype == torch.uint8
    unk = lambda text: "".join(c if c in train_text else "\0" for c in text)  # noqa: E731
    assert data.decode(data.val) == unk(WORKS["c_poem"]) == "\0onnet \0 one"  # 'S', '~': held out only
    assert (data.val == S.UNK).sum() == 2 and (data.train == S.UNK).sum() == 0
    assert data.decode(data.test) == unk(WORKS["e_play"]) and (data.test == S.UNK).sum() > 0


def test_held_out_works_must_exist_and_be_disjoint():
    with pytest.raises(ValueError, match="held-out"):
        S.build(WORKS, val_works=("nope",), test_works=("e_play",))
    with pytest.raises(ValueError, match="held-out"):
        S.build(WORKS, val_works=("e_play",), test_works=("e_play",))


def test_the_fixed_split_holds_out_real_works():
    assert set(S.VAL_WORKS) <= set(S.WORKS) and set(S.TEST_WORKS) <= set(S.WORKS)
    assert not set(S.VAL_WORKS) & set(S.TEST_WORKS) and len(S.WORKS) == 42


def test_gutenberg_boilerplate_is_stripped():
    body = "ACT I.\r\nEnter Hamlet.\r\n"
    text = ("The Project Gutenberg EBook of Hamlet\r\n*** START OF THIS PROJECT GUTENBERG EBOOK "
            "HAMLET ***\r\n\r\n" + body + "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
            "license text\r\n")
    assert S.strip_gutenberg(text) == "ACT I.\nEnter Hamlet."
    assert S.strip_gutenberg("\nplain text\n\n") == "plain text"


def test_windows_are_contiguous_slices_shifted_by_one():
    tokens = torch.arange(250, dtype=torch.uint8)  # distinct values: a window's start is its first
    x, y = S.windows(tokens, batch=16, context=10, seed=3, step=7)
    assert x.shape == y.shape == (16, 10) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        i = int(row_x[0])
        assert torch.equal(row_x, tokens[i:i + 10].long())
        assert torch.equal(row_y, tokens[i + 1:i + 11].long())
    assert int(x[:, 0].max()) <= 250 - 11


def test_a_steps_windows_depend_on_seed_and_step_alone():
    tokens = torch.arange(250, dtype=torch.uint8)
    fresh = S.windows(tokens, 8, 10, seed=1, step=500)
    torch.manual_seed(123)  # the global generator plays no part
    for step in range(5):  # steps run before in this process
        S.windows(tokens, 8, 10, seed=1, step=step)
    again = S.windows(tokens, 8, 10, seed=1, step=500)
    assert torch.equal(fresh[0], again[0]) and torch.equal(fresh[1], again[1])
    assert not torch.equal(fresh[0], S.windows(tokens, 8, 10, seed=1, step=501)[0])
    assert not torch.equal(fresh[0], S.windows(tokens, 8, 10, seed=2, step=500)[0])


def test_eval_windows_tile_the_split_from_its_start():
    tokens = torch.arange(35, dtype=torch.uint8)
    x, y = S.eval_windows(tokens, context=8)
    assert torch.equal(x.flatten(), torch.arange(32)) and torch.equal(y.flatten(), torch.arange(1, 33))
    assert S.eval_windows(tokens, context=8, max_windows=2)[0].shape == (2, 8)


def _write_texts(root: Path, skip: str | None = None) -> Path:
    folder = root / "texts"
    folder.mkdir(parents=True)
    for w in S.WORKS:
        if w != skip:
            (folder / f"{w}_gut.txt").write_text(f"{w.upper()}\n\nThe text of {w}.\n")
        (folder / f"{w}_gut_f.txt").write_text("folio duplicate, never read")
    return folder


def test_texts_are_read_one_version_per_work(tmp_path):
    _write_texts(tmp_path)
    works = S.read_works(tmp_path, verify=False)
    assert sorted(works) == list(S.WORKS)
    assert works["hamlet"] == "HAMLET\n\nThe text of hamlet."
    data = S.build(works)
    assert len(data.train_works) == 36 and not set(data.train_works) & set(S.TEST_WORKS)


@pytest.mark.parametrize("case", ["absent", "work_missing", "damaged"])
def test_a_bad_folder_is_one_data_error_naming_the_path_and_the_fix(tmp_path, case):
    if case == "absent":
        expected = str(tmp_path / "texts")
    elif case == "work_missing":
        _write_texts(tmp_path, skip="hamlet")
        expected = str(tmp_path / "texts" / "hamlet_gut.txt")
    else:
        _write_texts(tmp_path)  # the right names, but not the sdist's bytes
        expected = str(tmp_path / "texts" / f"{S.WORKS[0]}_gut.txt")
    with pytest.raises(DataError) as err:
        S.load(tmp_path)
    message = str(err.value)
    assert expected in message and "make setup" in message and "\n" not in message
    if case == "work_missing":
        assert "41 of 42 works" in message


REAL = Path(S.DEFAULT_ROOT)


@pytest.mark.skipif(not (REAL / "texts").is_dir(), reason="data/shakespeare absent: make setup")
def test_the_real_files():
    data = S.load(REAL)
    assert len(data.train_works) == 36 and data.val_works == tuple(sorted(S.VAL_WORKS))
    assert len(data.train) + len(data.val) + len(data.test) > 5_000_000
    assert data.vocab_size == 85 and (data.train == S.UNK).sum() == 0
    assert data.decode(data.test[:7]) == "MACBETH"  # macbeth < richard_ii < twelfth_night
    hamlet = (REAL / "texts" / "hamlet_gut.txt").read_text()
    assert hamlet.strip("\n") in data.decode(data.train)
    assert (REAL / "texts" / "macbeth_gut.txt").read_text().strip("\n") not in data.decode(data.train)
