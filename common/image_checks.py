"""Whether an image file can be used, in one place for the shard builder and for inference.

Every reason an image is left out (``missing file``, ``cannot decode``, ...) is made here,
so ``skipped.csv`` and the submission's problems file speak the same words.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not come out half grey
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class ImageProblem(Exception):
    """The image cannot be used; ``str(exc)`` is the reason, as written in reports."""


def read_image_file(path: str | Path) -> bytes:
    """The file's bytes; ImageProblem when it is missing, unreadable or empty."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageProblem("missing file") from None
    except OSError as exc:
        raise ImageProblem(f"unreadable file ({exc.strerror or exc})") from None
    if not data:
        raise ImageProblem("zero-byte file")
    return data


@contextlib.contextmanager
def decoding():
    """Turn whatever a decoder raises into an ImageProblem with a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the pixels are what counts
            yield
    except UnidentifiedImageError:
        raise ImageProblem("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageProblem("truncated" if "truncated" in str(exc).lower() else "cannot decode") from None


def verify_image(data: bytes) -> None:
    """Raise ImageProblem unless ``data`` decodes completely. A JPEG is decoded at 1/8 scale: the whole
    compressed stream is still read and checked, at a fraction of the cost."""
    if not data:
        raise ImageProblem("zero-byte file")
    with decoding():
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()


def check_image_file(path: str | Path) -> str | None:
    """The reason the file cannot be used, or None when it reads and decodes completely."""
    try:
        verify_image(read_image_file(path))
    except ImageProblem as exc:
        return str(exc)
    return None
