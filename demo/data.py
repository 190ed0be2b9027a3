"""Generate a small Inclusive-Images-like dataset in the exact Kaggle layout.

Classes are (shape, colour) pairs; each image holds one to four of them. Training
images are filled shapes on soft noisy backgrounds; stage-1/2 test images come from
"another part of the world": the same shapes drawn as outlines on smooth gradients of
any colour, and fewer labels per image (one to three). A model trained on the training images
alone transfers badly; a short fine-tune on the tuning labels fixes most of it,
which is the challenge in miniature.

As in the real data, the human labels miss some of what an image shows (verified negatives
are right), and ``train_machine_labels.csv`` adds a classifier's guesses: most true labels
(the missed ones too) at high confidences, some wrong ones at lower confidences, none at all
for some images.

    python -m demo.data OUT_DIR [--train N] [--stage1 N] [--stage2 N] [--tune N]
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.atomic import atomic_write_csv
from common.cli import command

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (230, 210, 40), "magenta": (200, 50, 200)}
UNUSED_TRAINABLE = 2  # like the real list, a few trainable classes never occur
HUMAN_MISS = 0.12  # share of an image's classes (beyond its first) that the human labels leave out
MACHINE_FINDS = 0.8  # share of an image's true classes the machine labels list
MACHINE_WRONG = 0.7  # wrong machine labels per image, on average
MACHINE_CONFIDENCES = {"true": ([0.6, 0.7, 0.8, 0.9, 1.0], [0.1, 0.15, 0.2, 0.25, 0.3]),
                       "wrong": ([0.5, 0.6, 0.7, 0.8], [0.4, 0.3, 0.2, 0.1])}


def class_codes() -> list[tuple[str, str]]:
    """(label_code, description) for every class that occurs in the images."""
    out = []
    for i, (shape, colour) in enumerate((s, c) for s in SHAPES for c in COLOURS):
        out.append((f"/m/0dm{i:02d}", f"{colour.capitalize()} {shape}"))
    return out


@dataclass
class Layout:
    """Where the generator put things (mirrors config.yaml's paths)."""
    original_images: Path
    competition_data: Path


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour, hollow: bool):
    """A filled shape, or (shifted domain) only its outline, drawn in the class colour."""
    x0, y0, x1, y1 = box
    width = max(3, (x1 - x0) // 7)
    fill, outline = (None, colour) if hollow else (colour, None)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        points = [((x0 + x1) // 2, y0), (x1, y1), (x0, y1)]
        if hollow:
            draw.line(points + points[:1], fill=colour, width=width, joint="curve")
        else:
            draw.polygon(points, fill=colour)
    else:
        w = max(4, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        for rect in ((cx - w // 2, y0, cx + w // 2, y1), (x0, cy - w // 2, x1, cy + w // 2)):
            draw.rectangle(rect, fill=fill, outline=outline, width=max(2, width // 2))


def _background(rng: np.random.Generator, w: int, h: int, shifted: bool) -> Image.Image:
    if not shifted:  # soft, muted noise
        base = rng.integers(90, 170, size=3)
        noise = rng.normal(0, 18, size=(h // 4 + 1, w // 4 + 1, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
    # shifted domain: smooth gradients between two random colours, darker or lighter than training's
    a, b = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    t = np.linspace(0, 1, h)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, w)[None, :, None]
    arr = (a * (1 - t) + b * t) * np.ones((h, w, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_image(rng: np.random.Generator, classes: list[int], shifted: bool) -> Image.Image:
    """One image holding the given classes; ``shifted``: the test images' other appearance."""
    w, h = int(rng.integers(96, 136)), int(rng.integers(80, 112))
    im = _background(rng, w, h, shifted)
    draw = ImageDraw.Draw(im)
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    for k in classes:
        shape, colour = pairs[k]
        size = int(rng.integers(24, 40))
        x0, y0 = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
        _draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), COLOURS[colour], hollow=shifted)
    return im


def _labels(rng: np.random.Generator, n_classes: int, max_labels: int) -> list[int]:
    return sorted(rng.choice(n_classes, size=int(rng.integers(1, max_labels + 1)), replace=False).tolist())


def machine_label_rows(rng: np.random.Generator, image_id: str, labels: list[int], codes: list[tuple[str, str]]
                       ) -> list[list[str]]:
    """A classifier's guesses for one training image: missed labels, wrong labels, fractional confidences."""
    def conf(kind: str) -> str:
        values, weights = MACHINE_CONFIDENCES[kind]
        return f"{rng.choice(values, p=weights):.1f}"
    found = [k for k in labels if rng.random() < MACHINE_FINDS]
    others = [k for k in range(len(codes)) if k not in labels]
    wrong = rng.choice(others, size=min(len(others), rng.poisson(MACHINE_WRONG)), replace=False).tolist()
    return ([[image_id, "machine", codes[k][0], conf("true")] for k in found]
            + [[image_id, "machine", codes[k][0], conf("wrong")] for k in wrong])


def _hex_id(rng: np.random.Generator, digits: int) -> str:
    return "".join(rng.choice(list("0123456789abcdef"), size=digits))


def generate_demo_data(root: Path, n_train: int = 2000, n_stage1: int = 600, n_stage2: int = 500,
                       n_tune: int = 450, seed: int = 0, quality: int = 92) -> Layout:
    """Write the dataset under ``root``; returns where the images and CSVs are."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    layout = Layout(root / "original_images", root / "inclusive")
    train_dir = layout.original_images / "train"
    comp = layout.competition_data
    for d in (train_dir, comp / "stage_1_test_images", comp / "stage_2_test_images"):
        d.mkdir(parents=True, exist_ok=True)
    codes = class_codes()
    n = len(codes)
    unused = [(f"/m/0dmu{i}", f"Unused class {i}") for i in range(UNUSED_TRAINABLE)]
    untrainable = [("/m/0dmx0", "Not trainable"), ("/m/0dmx1", "Red circle")]  # a repeated description
    atomic_write_csv(comp / "classes-trainable.csv", ["label_code"], [[c] for c, _ in codes + unused])
    atomic_write_csv(comp / "class-descriptions.csv", ["label_code", "description"], codes + unused + untrainable)

    rows, machine_rows = [], []
    noise = np.random.default_rng([seed, 1])  # label noise from its own stream: the images stay as they were
    for _ in range(n_train):
        image_id = _hex_id(rng, 16)
        labels = _labels(rng, n, 4)
        render_image(rng, labels, shifted=False).save(train_dir / f"{image_id}.jpg", quality=quality)
        told = [k for i, k in enumerate(labels) if i == 0 or noise.random() >= HUMAN_MISS]
        rows += [[image_id, "verification", codes[k][0], "1"] for k in told]
        machine_rows += machine_label_rows(noise, image_id, labels, codes)
        absent = [k for k in rng.choice(n, size=2, replace=False) if k not in labels]
        rows += [[image_id, "verification", codes[k][0], "0"] for k in absent]
        if rng.random() < 0.05:
            rows.append([image_id, "crowdsource-verification", untrainable[0][0], "1"])
    atomic_write_csv(comp / "train_human_labels.csv", ["ImageID", "Source", "LabelName", "Confidence"], rows)
    atomic_write_csv(comp / "train_machine_labels.csv", ["ImageID", "Source", "LabelName", "Confidence"],
                     machine_rows)

    for stage, count in ((1, n_stage1), (2, n_stage2)):
        solution = []
        folder = comp / f"stage_{stage}_test_images"
        for _ in range(count):
            image_id = _hex_id(rng, 24)
            labels = _labels(rng, n, 3)
            render_image(rng, labels, shifted=True).save(folder / f"{image_id}.jpg", quality=quality)
            solution.append([image_id, " ".join(codes[k][0] for k in labels)])
        atomic_write_csv(comp / f"stage_{stage}_solution.csv", ["image_id", "labels"], solution)
        atomic_write_csv(comp / f"stage_{stage}_sample_submission.csv", ["image_id", "labels"],
                   [[i, f"{codes[0][0]} {codes[1][0]}"] for i, _ in solution])
        if stage == 1:
            atomic_write_csv(comp / "tuning_labels.csv", None, solution[:n_tune])
    return layout


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--stage1", type=int, default=600)
    parser.add_argument("--stage2", type=int, default=500)
    parser.add_argument("--tune", type=int, default=450)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layout = generate_demo_data(args.out, args.train, args.stage1, args.stage2, args.tune, args.seed)
    log.info("demo data in %s and %s", layout.competition_data, layout.original_images)


if __name__ == "__main__":
    main()
