"""``python -m alsals_bench`` is ``alsals-bench``."""

import sys

from alsals_bench.cli import main

sys.exit(main())
