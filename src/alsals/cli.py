"""The ``alsals`` command: ``alsals bench ...`` (the benchmark suite, extra ``bench``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: alsals bench [list|fetch|run|report] [options]   (alsals bench -h for more)")
        return 0
    if args[0] != "bench":
        print(f"alsals: unknown command {args[0]!r}; try: alsals bench -h", file=sys.stderr)
        return 2
    try:
        from alsals.bench.cli import main as bench_main
    except ImportError as error:  # the benchmark's extras are optional
        print(
            f"alsals bench needs the benchmark extras ({error}): pip install 'alsals[bench]'",
            file=sys.stderr,
        )
        return 2
    return bench_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
