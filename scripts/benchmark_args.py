"""Argument types the benchmark scripts share: a bad value is refused by argparse in one line before any
measuring starts, never found minutes later as a traceback (an empty list of windows, an unwritable --json)."""
from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError
from common.paths import writable_file


def at_least_one(text: str) -> int:
    """A whole number of at least 1 (windows, repeats, images, threads, steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: at least 1")
    return value


def positive_seconds(text: str) -> float:
    """A duration of more than 0 seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: must be more than 0")
    return value


def output_file(text: str) -> Path:
    """A file the results can be written to, checked now rather than after the run."""
    try:
        return writable_file(Path(text), "the path")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
