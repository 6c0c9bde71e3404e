"""Thin wrapper: the same as ``kfac-dist bench convergence`` (see kfac_dist/app/bench/convergence.py).

Usage: python scripts/bench_convergence.py [--full] [--out docs/results/convergence] [...]
"""

from __future__ import annotations

from kfac_dist.app.bench.convergence import main

if __name__ == "__main__":
    raise SystemExit(main())
