"""``python -m alsals.bench`` is ``alsals bench``."""

import sys

from alsals.bench.cli import main

sys.exit(main())
