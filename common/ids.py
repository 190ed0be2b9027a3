"""Image ids come from CSV files: they become paths only after this check."""
from __future__ import annotations

import re
from pathlib import Path

PLAIN_ID = re.compile(r"^[0-9A-Za-z_-]+\Z")  # \Z, not $: "$" also matches before a final newline


def is_plain_id(image_id: str) -> bool:
    return bool(PLAIN_ID.match(image_id))


def image_path(folder: Path, image_id: str, ext: str = ".jpg") -> Path:
    """``folder/<image_id>.jpg``; raises ValueError for an id that is not a plain name."""
    if not is_plain_id(image_id):
        raise ValueError(f"image id {image_id!r} is not a plain name")
    return Path(folder) / f"{image_id}{ext}"
