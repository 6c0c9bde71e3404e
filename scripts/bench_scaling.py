"""Thin wrapper: the same as ``kfac-dist bench scaling`` (see kfac_dist/app/bench/scaling.py).

Usage: python scripts/bench_scaling.py [--full] [--out docs/results/scaling] [...]
"""

from __future__ import annotations

from kfac_dist.app.bench.scaling import main

if __name__ == "__main__":
    raise SystemExit(main())
