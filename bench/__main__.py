"""``python -m bench``: the benchmark harness (``make bench``); see bench/harness.py and docs/performance.rst."""

import sys

from bench.harness import main

sys.exit(main())
