"""Argument types shared by the subcommands: a bad value is a usage error at parse time
(argparse prints it on one line and exits with status 2), before anything runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable

#: The largest seed: torch seeds its generators with 64-bit integers (a task also seeds one
#: with ``seed + 1``); a larger seed ended a run in a traceback from ``manual_seed``.
MAX_SEED = 2**63 - 1


def int_at_least(minimum: int, what: str = "", maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (``what`` says what it counts), and
    <= ``maximum`` where one is given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        extra = f" ({what})" if what else ""
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}{extra}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is above {maximum}{extra}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def names_of(known: Callable[[], dict] | dict, what: str) -> Callable[[str], str]:
    """An argparse type: a comma-separated list of keys of ``known`` (returned as given)."""

    def parse(text: str) -> str:
        names = known() if callable(known) else known
        for name in (n for n in text.split(",") if n):
            if name not in names:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {name!r}; known: {', '.join(names)}"
                )
        return text

    parse.__name__ = f"list of {what}s"
    return parse
