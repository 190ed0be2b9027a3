"""A picture of what the model sees: one PNG grid of the loaders' own batches.

    python -m dali_pipes.preview --config config.yaml --out batch.png [--images 8] [--set k=v ...]

Rows, top to bottom: the train loader's crops at each side of the resolution schedule (``train.resolution``; the
crop side alone without one), as the loader hands them over (flips applied), each crop at its own size and with
its labels under it; the same train images come in every row, with the same windows, so a row differs from the
next in pixels alone. Then the eval views: the ten crops of one validation image (``tencrop``: four corners,
centre, and their mirror images), and the centre crop of stage-1 test images at each ``tune.test_resolutions``
candidate (else at the training one). Look at it before a long run: a wrong crop, a flip that is not one, labels
on the wrong images or a schedule that does not rise show at a glance.
"""
from __future__ import annotations

import csv
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.atomic import atomic_write
from common.cli import command, config_from_args, config_parser
from common.image_checks import check_image_file
from common.paths import writable_file
from common.runtime import InputAdapter
from common.shard_format import split_shards
from common.vocab import Vocabulary
from dali_pipes.loader import ImageFileLoader, eval_loader, train_loader
from dali_pipes.settings import PipeSettings, ResolutionSchedule

log = logging.getLogger(__name__)

LABEL_LINES = 2  # label text lines under each crop
PAD, LINE = 6, 11


@dataclass
class Row:
    title: str
    crops: list[np.ndarray]  # HWC uint8
    captions: list[str]


def pixels(images: torch.Tensor, to_input: InputAdapter) -> list[np.ndarray]:
    """The loader's batch (any form it hands over) as displayable HWC uint8 crops; a view axis is flattened."""
    x = to_input(images).float().cpu()
    x = x.flatten(0, 1) if x.dim() == 5 else x
    x = x * torch.tensor(to_input.std).view(1, 3, 1, 1) + torch.tensor(to_input.mean).view(1, 3, 1, 1)
    return list((x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())


def class_names(competition_data: Path, codes: list[str]) -> list[str]:
    """Each class's description (``class-descriptions.csv``), its code where there is none."""
    names = {}
    try:
        with open(Path(competition_data) / "class-descriptions.csv", newline="") as f:
            names = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
    except OSError:
        pass
    return [names.get(code, code) for code in codes]


def caption(targets: torch.Tensor, names: list[str]) -> str:
    return ", ".join(names[c] for c in torch.nonzero(targets.cpu() > 0).flatten().tolist()) or "(none)"


def preview_rows(cfg, images: int = 8) -> list[Row]:
    pipes, to_input = PipeSettings.from_config(cfg), InputAdapter.from_config(cfg)
    names = class_names(cfg.paths.competition_data, Vocabulary.load(cfg.paths.shards).codes)
    schedule = ResolutionSchedule.from_config(cfg)
    train = split_shards(cfg.paths.shards, "train")
    sizes = schedule.sizes(cfg.train.epochs)
    rows, resized = [], schedule.resizes(cfg.train.epochs, pipes.crop_size)
    for side in sizes:  # the same seed in every row: the same images and windows, at each side
        batch, targets = next(iter(train_loader(pipes, train, images, size=side if resized else None)))
        epochs = [e + 1 for e in range(cfg.train.epochs) if schedule(e) == side]
        rows.append(Row(f"train {side} px (epochs {epochs[0]}-{epochs[-1]})", pixels(batch, to_input),
                        [caption(t, names) for t in targets]))
    view, targets, ids = next(iter(eval_loader(pipes, split_shards(cfg.paths.shards, "val"), 1, tta="tencrop")))
    rows.append(Row(f"ten-crop of {ids[0]}", pixels(view, to_input), [caption(targets[0], names)] * 10))
    files = [f for f in sorted((Path(cfg.paths.competition_data) / "stage_1_test_images").glob("*.jpg"))[:4 * images]
             if check_image_file(str(f)) is None][:images]  # DALI stops on an image it cannot decode
    candidates = cfg.tune.test_resolutions or [(cfg.data.shortest_side, cfg.pipeline.crop_size)]
    if files:
        for short, crop in candidates:
            batch, _ = next(iter(ImageFileLoader(pipes, files, len(files), resolution=(short, crop))))
            rows.append(Row(f"test {short}/{crop}", pixels(batch, to_input), [f.stem for f in files]))
    return rows


def draw(rows: list[Row]) -> Image.Image:
    """The rows as one grid: a title line over each row, each crop at its own size in a cell of the largest."""
    font = ImageFont.load_default()
    cell = max(c.shape[0] for r in rows for c in r.crops)
    width = PAD + max(len(r.crops) for r in rows) * (cell + PAD)
    row_height = LINE + cell + LABEL_LINES * LINE + PAD
    grid = Image.new("RGB", (width, PAD + len(rows) * row_height), "white")
    pen = ImageDraw.Draw(grid)
    chars = max(4, cell // 6)
    for k, row in enumerate(rows):
        top = PAD + k * row_height
        pen.text((PAD, top), row.title, fill="black", font=font)
        for j, (crop, text) in enumerate(zip(row.crops, row.captions)):
            left = PAD + j * (cell + PAD)
            grid.paste(Image.fromarray(crop), (left, top + LINE))
            for n, line in enumerate(textwrap.wrap(text, chars)[:LABEL_LINES]):  # whole words, as many as fit
                pen.text((left, top + LINE + cell + n * LINE), line, fill="dimgray", font=font)
    return grid


@command
def main(argv=None):
    parser = config_parser("python -m dali_pipes.preview", __doc__)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--images", type=int, default=8, help="images per row (default 8)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    cfg = config_from_args(args)
    writable_file(args.out, "--out")
    rows = preview_rows(cfg, args.images)
    with atomic_write(args.out, "wb") as f:
        draw(rows).save(f, format="PNG")
    log.info("wrote %s: %s", args.out, "; ".join(f"{r.title} ({len(r.crops)})" for r in rows))
    return rows


if __name__ == "__main__":
    main()
