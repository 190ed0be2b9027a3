"""Photographs for the benchmarks and the GPU check: scikit-image's samples cropped and rescaled into many JPEGs.

Synthetic noise compresses and decodes unlike photographs; these behave like Open Images.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from common.atomic import atomic_write_csv
from demo.data import Layout

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "cat", "motorcycle_left", "page")


def sample_photos() -> list[np.ndarray]:
    from skimage import data
    out = []
    for name in PHOTOS:
        try:
            arr = getattr(data, name)()
        except Exception:  # some samples need a download; skip those
            continue
        out.append(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3])
    return out


def photo_jpegs(count: int, short_side: int = 256, max_aspect: float = 1.5, quality: int = 95,
                long_side: int | None = None, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs: random crops of the sample photos, scaled to ``short_side`` (or ``long_side``)."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    out = []
    for k in range(count):
        arr = photos[k % len(photos)]
        h, w = arr.shape[:2]
        aspect = rng.uniform(1, max_aspect)
        ch = int(min(h, w / aspect) * rng.uniform(0.5, 1.0))
        cw = int(ch * aspect)
        if rng.random() < 0.3:
            ch, cw = min(cw, h), min(ch, w)  # some portrait crops
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(arr[y:y + ch, x:x + cw])
        scale = (long_side / max(im.size)) if long_side else (short_side / min(im.size))
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
        if im.mode != "RGB":
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_photo_dataset(root: Path, count: int, short_side: int = 256, num_classes: int = 100,
                        seed: int = 0) -> Layout:
    """A Kaggle-layout training set of ``count`` photographs with random labels (for throughput only)."""
    rng = np.random.default_rng(seed)
    layout = Layout(Path(root) / "original_images", Path(root) / "inclusive")
    (layout.original_images / "train").mkdir(parents=True, exist_ok=True)
    (layout.competition_data / "stage_1_test_images").mkdir(parents=True, exist_ok=True)
    codes = [f"/m/0ph{i:03d}" for i in range(num_classes)]
    atomic_write_csv(layout.competition_data / "classes-trainable.csv", ["label_code"], [[c] for c in codes])
    atomic_write_csv(layout.competition_data / "class-descriptions.csv", ["label_code", "description"],
               [[c, f"class {i}"] for i, c in enumerate(codes)])
    rows = []
    for k, jpeg in enumerate(photo_jpegs(count, short_side, seed=seed)):
        image_id = f"{k:016x}"
        (layout.original_images / "train" / f"{image_id}.jpg").write_bytes(jpeg)
        for c in rng.choice(num_classes, size=int(rng.integers(1, 8)), replace=False):
            rows.append([image_id, "verification", codes[c], "1"])
    atomic_write_csv(layout.competition_data / "train_human_labels.csv", ["ImageID", "Source", "LabelName", "Confidence"],
               rows)
    atomic_write_csv(layout.competition_data / "tuning_labels.csv", None, [])
    return layout
