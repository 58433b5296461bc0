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


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text}")
    return value


def number_at_least(lo: float):
    """An argparse type: a finite number >= ``lo``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number >= {lo:g}, got {text!r}") from None
        if not lo <= value < float("inf"):  # NaN too
            raise argparse.ArgumentTypeError(f"expected a finite number >= {lo:g}, got {text}")
        return value

    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value
