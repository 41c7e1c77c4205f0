"""Every figure from results/ alone: the same as ``abexp figures`` (abexp/figures/make.py),
kept so that ``python analysis/make_figures.py --results DIR`` still works."""

import sys

from abexp.figures.make import main

if __name__ == "__main__":
    sys.exit(main())
