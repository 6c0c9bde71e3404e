"""Thin wrapper: the same as ``kfac-dist bench overhead`` (see launch/bench/overhead.py).

Usage: python scripts/bench_overhead.py [--full] [--out docs/results/overhead] [...]
"""

from __future__ import annotations

from launch.bench.overhead import main

if __name__ == "__main__":
    raise SystemExit(main())
