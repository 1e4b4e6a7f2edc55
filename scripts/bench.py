"""Benchmark: fedsim's engine vs a naive per-client loop vs Flower's simulation engine vs the FLOP bound.

    python scripts/bench.py            # the full reference run (a few minutes)
    python scripts/bench.py --quick    # reduced, under a minute
    python scripts/bench.py --json     # one JSON object

The same as ``fedsim bench``; the logic lives in :mod:`fedsim_bench` (see its docstring and
docs/benchmarks.md for what is measured and how).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from fedsim_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
