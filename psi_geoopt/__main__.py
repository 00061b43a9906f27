"""``python -m psi_geoopt``: the ``psi-geoopt`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
