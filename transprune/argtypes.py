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


def image_size(value: str) -> tuple[int, int]:
    """An argparse type: ``HEIGHTxWIDTH`` in pixels, both > 0."""
    try:
        h, w = (int(v) for v in value.lower().split("x"))
        if h > 0 and w > 0:
            return (h, w)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 672x672, got {value!r}")


def budget_fraction(value: str) -> float:
    """An argparse type: a budget, paper-convention TFLOPs relative to unpruned, in (0, 1]."""
    try:
        x = float(value)
        if 0 < x <= 1:
            return x
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a fraction of the unpruned TFLOPs in (0, 1], e.g. 0.41, got {value!r}")
