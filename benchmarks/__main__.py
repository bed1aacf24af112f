"""``python -m benchmarks``: PARE's benchmarks (run from a checkout of the repository; see docs/benchmarks.md)."""

import logging
import sys

from .runner import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
