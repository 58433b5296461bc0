"""argparse ``type=`` checks shared by the command line: a bad count or duration is named by argparse itself
(``pskernels demo: error: argument --repeats: expected an int >= 1, got 0``, exit status 2) before any model loads."""
from __future__ import annotations

import argparse


def int_at_least(lo: int):
    """An argparse type: an int >= ``lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {value}")
        return value

    return parse


def _number(accepts, expected: str):
    """An argparse type: a float for which ``accepts(value)`` holds (NaN fails every comparison), refused as
    ``expected {expected}, got ...`` otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


positive_seconds = _number(lambda v: v > 0, "seconds > 0")
"""An argparse type: a number of seconds > 0."""

positive_number = _number(lambda v: 0 < v < float("inf"), "a finite number > 0")
"""An argparse type: a finite number > 0."""


def number_at_least(lo: float):
    """An argparse type: a finite number >= ``lo``."""
    return _number(lambda v: lo <= v < float("inf"), f"a finite number >= {lo:g}")
