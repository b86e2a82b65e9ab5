"""Launcher for `dama precompute-ref` (see `python scripts/precompute_ref_logps.py --help`): reference log-probs."""

import sys

from dama.offline.reference import main

if __name__ == "__main__":
    sys.exit(main())
