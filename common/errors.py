"""The faults a user or the machine causes, reported in one line (see ``common.cli.command``)."""
from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path

# PyTorch's "CUDA out of memory", DALI's "Can't allocate 123 bytes on device" (and its pinned-host
# twin), the C++ allocators' bad_alloc: the machine ran out, whatever was being decoded or computed
OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate \d+ bytes|cannot allocate memory|bad_alloc", re.IGNORECASE)


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or bool(OUT_OF_MEMORY.search(str(exc)))


class UserError(Exception):
    """Bad input from the user (config, CLI, data files): reported in one line, no traceback."""


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that ``exc`` is, or that it was raised while handling (torch.save, for one, turns a full
    disk into a RuntimeError about its zip stream while it cleans up)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__context__, seen + 1
    return None


@contextlib.contextmanager
def writing(path: str | Path):
    """Name ``path`` in an OSError raised while writing it: a failed ``write()`` carries no file name,
    and "no space left" is only useful with the place it happened."""
    try:
        yield
    except Exception as exc:
        os_error = _os_error_in(exc)
        if os_error is None:
            raise
        if os_error.filename is None:
            os_error.filename = str(path)
        if os_error is exc:
            raise
        raise os_error from None


def describe_os_error(exc: OSError) -> str | None:
    """One line for a fault of the machine (full disk, read-only or forbidden folder), else None."""
    where = exc.filename or "a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device while writing {where}: free space and run the same command again"
    if exc.errno == errno.EROFS:
        return f"cannot write {where}: the file system is read-only; choose another folder in the config's paths"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot access {where}: permission denied"
    if exc.errno == errno.EIO:
        return f"input/output error on {where}: the disk or its connection is failing"
    return None
