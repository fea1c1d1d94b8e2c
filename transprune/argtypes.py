"""argparse value types shared by the command line, `transprune bench` and the mini tools."""

from __future__ import annotations

import argparse


def at_least(low: int):
    """An argparse type: an integer >= ``low`` (anything else is a usage error naming the bound)."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value!r}")
        return n

    return parse


count = at_least(0)
positive = at_least(1)
