"""Thin wrapper: the same as ``kfac-dist bench comm`` (see kfac_dist/app/bench/comm.py).

Usage: python scripts/bench_comm.py [--full] [--out docs/results/comm] [...]
"""

from __future__ import annotations

from kfac_dist.app.bench.comm import main

if __name__ == "__main__":
    raise SystemExit(main())
