"""``python -m fastshare.bench``: the same as ``fastshare bench``."""

import sys

from fastshare.bench.suite import main

sys.exit(main())
