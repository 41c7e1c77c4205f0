"""analysis/char_entropy.py: the frequency-only baseline a GPT's loss is read against."""

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_entropy_of_the_character_counts_of_every_work(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("char_entropy", ROOT / "analysis" / "char_entropy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a_gut.txt").write_text("aab")
    (tmp_path / "texts" / "b_gut.txt").write_text("b")
    (tmp_path / "texts" / "a_gut_f.txt").write_text("zzzz")  # a folio duplicate: not read
    assert module.main(["--root", str(tmp_path)]) == 0
    expected = -2 * (0.5 * math.log(0.5))  # a, a, b, b
    assert f"2 works, 4 characters, 2 distinct: {expected:.3f} nats/char" in capsys.readouterr().out
    assert module.main(["--root", str(tmp_path / "missing")]) == 2
