"""``python -m launch <command> ...``: the same as the ``kfac-dist`` command."""

import sys

from kfac_dist.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
