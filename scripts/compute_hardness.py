"""Launcher for `dama hardness` (see `python scripts/compute_hardness.py --help`): CLIP hardness of every pair."""

import sys

from dama.offline.hardness import main

if __name__ == "__main__":
    sys.exit(main())
