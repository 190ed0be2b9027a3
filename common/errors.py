"""The faults a user or the machine causes, reported in one line (see ``common.cli.command``)."""
from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path

# PyTorch's "CUDA out of memory", DALI's "Can't allocate 123 bytes on device" (and its pinned-host
# twin), the C++ allocators' bad_alloc: the machine ran out, whatever was being decoded or computed
OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate \d+ bytes|cannot allocate memory|bad_alloc", re.IGNORECASE)


# A fault of the GPU, its driver or the link between GPUs, in PyTorch's, NCCL's or DALI's words: never the data's
DEVICE_FAILURE = re.compile(r"CUDA error|CUDA driver|cudaError|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL|"
                            r"illegal memory access|device-side assert|uncorrectable ECC|unspecified launch failure|"
                            r"nvJPEG error|NVML", re.IGNORECASE)
# the exception types PyTorch raises for them (torch.AcceleratorError, torch.distributed's backend errors)
DEVICE_FAILURE_TYPES = {"AcceleratorError", "DistBackendError", "DistNetworkError", "DistStoreError"}


# A sample a decoder could not decode, in DALI's words on either device: the image's fault, never the machine's,
# whatever else the message says. DALI's nvImageCodec decoders (CPU and mixed alike: dali/operators/imgcodec/
# image_decoder.h) say "Failed to decode sample #3 : <source>"; nvJPEG's own statuses for a bad or unsupported
# stream (dali/operators/decoder/nvjpeg/nvjpeg_helper.h: "nvJPEG error (3): Cannot parse the JPEG stream ...").
IMAGE_FAILURE = re.compile(r"Failed to decode sample|nvJPEG error \((3|4|10)\)|Cannot parse the JPEG stream|"
                           r"not supported by the nvJPEG library|Bitstream input data incomplete")


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or bool(OUT_OF_MEMORY.search(str(exc)))


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA, NCCL or driver error: the run's fault, wherever it surfaced (DALI's iterator included)."""
    return type(exc).__name__ in DEVICE_FAILURE_TYPES or bool(DEVICE_FAILURE.search(str(exc)))


def failure_kind(exc: BaseException) -> str:
    """What a failure is, from its type and then its words: "out_of_memory", "device" (the GPU, its driver,
    NCCL) or "other" (a bad image among them, however its decoder words it). The one place that tells them
    apart: the loaders, inference and the command frame ask it."""
    if is_out_of_memory(exc):
        return "out_of_memory"
    if type(exc).__name__ not in DEVICE_FAILURE_TYPES and IMAGE_FAILURE.search(str(exc)):  # nvJPEG names both kinds
        return "other"
    if is_device_failure(exc):
        return "device"
    return "other"


class UserError(Exception):
    """Bad input from the user (config, CLI, data files): reported in one line, no traceback."""


class DamagedData(UserError):
    """Data a command reads (a shard, a sample) cannot be read or decoded. The message names it; the command's
    frame adds the repair command, with the command's own --config and --set."""


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


@contextlib.contextmanager
def reading(path: str | Path, expected: str):
    """A text file read here that is not text (an image, a checkpoint, another encoding) is one line naming
    it and what was expected, not a decoder's traceback."""
    try:
        yield
    except UnicodeDecodeError:
        raise UserError(f"{path} is not {expected}: it is not UTF-8 text (an image, a checkpoint or another "
                        "binary file?)") from None


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
