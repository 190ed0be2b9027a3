"""One image in, one DALI-safe RGB baseline JPEG out (or the reason it cannot be used).

Pure function of the input bytes and settings, so results never depend on which
worker ran them.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageOps

from common.image_checks import ImageProblem, decoding

cv2.setNumThreads(1)  # one builder worker, one core: OpenCV's own threads would only oversubscribe them


def _is_packable_as_is(im: Image.Image, shortest_side: int) -> bool:
    """An RGB baseline JPEG of the right size and no EXIF rotation can be packed byte for byte."""
    return (im.format == "JPEG" and im.mode == "RGB" and min(im.size) == shortest_side
            and not im.info.get("progressive") and not im.info.get("progression")
            and im.getexif().get(0x0112, 1) == 1)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, 16-bit and alpha images become RGB; alpha is laid on white."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if im.mode.startswith("I;16") or im.mode == "I":
        im = im.point(lambda v: v / 256).convert("L")  # 16-bit grey: keep the top 8 bits
    return im.convert("RGB") if im.mode != "RGB" else im


def resized_size(width: int, height: int, shortest_side: int) -> tuple[int, int]:
    """(w, h) with the short side exactly ``shortest_side`` and the aspect ratio kept."""
    if width <= height:
        return shortest_side, max(1, round(height * shortest_side / width))
    return max(1, round(width * shortest_side / height)), shortest_side


def prepare_image(data: bytes, shortest_side: int, quality: int, reduced_decode: bool = True) -> tuple[bytes, bool]:
    """Return (jpeg_bytes, packed_as_is). Raises ImageProblem with the skip reason.

    A JPEG is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales that stays at least as large as
    the target (the DCT-domain reduction is itself a good antialiasing filter, and skips most of the
    decoding work), then resized to the exact target, computed from the original's dimensions, with
    OpenCV's bilinear filter, which does the remaining factor of at most 2 in a tenth of Pillow's time.
    (Measured against the original solution's OpenCV loop: python -m benchmarks.shard_builder.)
    """
    if not data:
        raise ImageProblem("zero-byte file")
    with decoding():
        im = Image.open(io.BytesIO(data))
        if _is_packable_as_is(im, shortest_side):
            # it must decode completely, as DALI cannot skip a bad sample later; at 1/8 scale libjpeg
            # still reads and checks the whole compressed stream, for a fraction of the cost
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            return data, True
        transposed = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
        width, height = (im.height, im.width) if transposed else im.size
        target = resized_size(width, height, shortest_side)  # always from the original's dimensions
        if reduced_decode and im.format == "JPEG":
            im.draft("RGB", target[::-1] if transposed else target)
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
    if im.size != target:
        im = Image.fromarray(cv2.resize(np.asarray(im), target, interpolation=cv2.INTER_LINEAR))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality, progressive=False, optimize=False)
    return out.getvalue(), False
