"""``python -m launch.train --config FILE [key.path=value ...]``: the same as ``kfac-dist train``."""

import sys

from kfac_dist.app.train import main

if __name__ == "__main__":
    sys.exit(main())
