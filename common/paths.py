"""Paths a user gives, checked before any long work: one line naming the path and the key or flag that set it.

Every command calls these first for the folders and files it will read or write, so that an output folder
that cannot be created, a file where a folder is expected (or the reverse), or a read-only disk stops it at
once rather than after an hour of training.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from common.errors import UserError


def _blocking_file(path: Path) -> Path | None:
    """The first part of ``path`` that exists and is not a folder (so no folder can be made below it)."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
    return None


def writable_dir(path: Path, key: str) -> Path:
    """``path`` as a folder this process can write in, created if need be."""
    path = Path(path)
    blocking = _blocking_file(path)
    if blocking is not None:
        where = "is a file" if blocking == path else f"cannot be made: {blocking} is a file"
        raise UserError(f"{key} {path} {where}; it must be a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{key} {path} cannot be created: {_why(exc)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        why = "the file system is read-only" if _read_only(path) else "permission denied"
        raise UserError(f"{key} {path} cannot be written: {why}")
    return path


def readable_dir(path: Path, key: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{key} {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{key} {path} is a file; it must be a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{key} {path} cannot be read: permission denied")
    return path


def readable_file(path: Path, key: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{key} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{key} {path} is a folder; it must be a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{key} {path} cannot be read: permission denied")
    return path


def writable_file(path: Path, key: str) -> Path:
    """A file this process can (re)write: not a folder, in a folder it can write in (created if need be)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{key} {path} is a folder; it must be a file")
    writable_dir(path.parent, f"the folder of {key}")
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _why(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    return exc.strerror or type(exc).__name__


def require_file(path: Path, what: str = "required file") -> Path:
    """Raise a one-line UserError unless ``path`` is an existing file."""
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")
    return Path(path)
