"""One image in, one DALI-safe RGB baseline JPEG out (or the reason it cannot be used).

Pure function of the input bytes and settings, so results never depend on which
worker ran them.
"""
from __future__ import annotations

import io
import math

from PIL import Image, ImageOps

from common.images import ImageProblem, decoding

__all__ = ["ImageProblem", "prepare_image", "resized_size"]


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
    """Return (jpeg_bytes, packed_as_is). Raises ImageProblem with the skip reason."""
    if not data:
        raise ImageProblem("zero-byte file")
    with decoding():
        im = Image.open(io.BytesIO(data))
        if _is_packable_as_is(im, shortest_side):
            im.load()  # must decode completely: DALI cannot skip a bad sample later
            return data, True
        if reduced_decode and im.format == "JPEG":
            w, h = im.size
            scale = shortest_side / min(w, h)
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while staying at least this large
            im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
    target = resized_size(*im.size, shortest_side)
    if im.size != target:
        # reducing_gap: box-reduce first, then bicubic; PIL documents 3.0 as indistinguishable from none
        im = im.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality, progressive=False, optimize=False)
    return out.getvalue(), False
