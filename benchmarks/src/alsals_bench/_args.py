"""Argument types shared by the subcommands: a bad value is a usage error at parse time
(argparse prints it on one line and exits with status 2), before anything runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(minimum: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (``what`` says what it counts)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            extra = f" ({what})" if what else ""
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}{extra}")
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
