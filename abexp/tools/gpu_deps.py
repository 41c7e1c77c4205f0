"""What gpu-check and a real ``abexp run`` import on a GPU node, checked before they start.

A GPU node's image (Python 3.12, its own CUDA torch, no network) lacks some of abexp's
dependencies. This module imports nothing but the standard library, so it can say in one line
what is missing where importing abexp itself would end in a traceback:

    python -m abexp.tools.gpu_deps            # one line naming what is missing, exit 2; else 0
    python -m abexp.tools.gpu_deps --missing  # the pip names of what is missing (for make gpu-check)

Optuna, wandb and psycopg are not needed: the run path imports them only for a sweep, a run
that logs to W&B (``tracking.wandb.mode: auto`` falls back to disabled without it) and a
PostgreSQL sweep storage. torchvision is needed only for ResNet-18/50 (the ImageNet models) and
the bench's naive pipeline: gpu-check notes its absence and skips those sections.
"""

from __future__ import annotations

import importlib.util
import sys

# import name -> pip name: what gpu-check (tests/test_gpu.py under pytest included) and
# `abexp run` import (abexp.config: pydantic, PyYAML; runner: tqdm; digits data: scikit-learn)
NEEDED = {"torch": "torch", "yaml": "PyYAML", "pydantic": "pydantic", "numpy": "numpy", "tqdm": "tqdm",
          "sklearn": "scikit-learn", "pytest": "pytest"}
OPTIONAL = {"torchvision": "torchvision"}


def missing(names: dict[str, str] = NEEDED) -> list[str]:
    """The pip names of ``names`` that this python cannot import."""
    gone = []
    for module, pip_name in names.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            gone.append(pip_name)
    return gone


def missing_line(gone: list[str]) -> str:
    return (f"gpu-check: {sys.executable} lacks {', '.join(gone)}: pip install {' '.join(gone)}, or run "
            "`make gpu-wheels` where there is a network and copy wheels/ here (make gpu-check installs from it)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gone = missing()
    if "--missing" in argv:
        print(" ".join(gone))
        return 0
    if gone:
        print(missing_line(gone), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
