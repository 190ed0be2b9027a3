"""Console output for every command: ``logging`` on rank 0 only, tqdm progress bars that follow it.

Modules log with ``logging.getLogger(__name__)``; a command's frame calls ``setup_logging``
once. Library calls (tests, notebooks) stay silent unless the caller configures logging.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

# "__main__": a command run as `python -m package.module` logs under that name
PACKAGES = ("common", "preprocessing", "dali_pipes", "model", "training", "inference", "demo", "__main__")


def rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", 0))


class _RankZero(logging.Filter):
    """Only rank 0 speaks: N processes repeating every line help nobody. Errors pass from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or rank() == 0


class _Formatter(logging.Formatter):
    """``2026-12-04 16:40:01 message``, a warning ``... warning: message``: a long run's log says when each thing
    happened. An error is a command's last word, ``error: message``, in the form scripts and launchers read."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{stamp} {message}" if record.levelno < logging.WARNING else f"{stamp} warning: {message}"


def setup_logging(level: int = logging.INFO) -> None:
    """Information to stdout, warnings and errors to stderr, for this project's loggers."""
    formatter, rank_zero = _Formatter(), _RankZero()
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
        handler.addFilter(rank_zero)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [out, err]
        logger.setLevel(level)
    # other libraries' warnings (DALI's, sent to the root logger) in the same form, once: the project's own records
    # reach the root too, and are printed above
    others = logging.StreamHandler(sys.stderr)
    others.setLevel(logging.WARNING)
    others.setFormatter(formatter)
    others.addFilter(rank_zero)
    others.addFilter(lambda r: r.name.split(".")[0] not in PACKAGES)
    others.iic_handler = True
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "iic_handler", False)] + [others]


def progress(logger: logging.Logger, **kwargs) -> tqdm:
    """A tqdm bar shown exactly when ``logger`` would print information (rank 0 of a command)."""
    shown = logger.isEnabledFor(logging.INFO) and rank() == 0
    return tqdm(disable=not shown, dynamic_ncols=True, **kwargs)
