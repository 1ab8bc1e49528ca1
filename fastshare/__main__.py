"""``python -m fastshare ...``: the command line of :mod:`fastshare.cli`."""

import sys

from fastshare.cli import main

if __name__ == "__main__":
    sys.exit(main())
