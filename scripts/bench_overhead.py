"""Thin wrapper: the same as ``kfac-dist bench overhead`` (see kfac_dist/app/bench/overhead.py).

Usage: python scripts/bench_overhead.py [--full] [--out docs/results/overhead] [...]
"""

from __future__ import annotations

from kfac_dist.app.bench.overhead import main

if __name__ == "__main__":
    raise SystemExit(main())
