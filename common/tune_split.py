"""The tune stage's data: the ``tune`` shards split into a part to fit and a part to choose the rule on.

The split is a training setting (``tune.holdout_fraction``), not a data one, so it is made
at the start of the stage, by repacking the ~1,000 tuning samples (a few MB) into two
small shard sets with their DALI indexes. It lives in ``common`` because two stages read it:
the tune stage, and ``inference.ensemble``, which must choose its rule on the very images
every tuned member held out.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from common.seeds import rng
from common.atomic import atomic_write_csv
from common.ids import image_path
from common.shard_format import (ShardWriter, SplitShards, decode_labels, decode_meta, index_samples, iter_samples,
                                 split_shards)
from common.vocab import Vocabulary

PARTS = ("fit", "holdout")
HOLDOUT_LABELS = "holdout_labels.csv"


def holdout_fingerprint(ids: list[str]) -> dict:
    """Which images a rule was chosen on: their number and the sha256 of their sorted ids. A tuned checkpoint
    records it, and an ensemble's rule must be chosen on the same images (``model.members.check_holdout``)."""
    text = "\n".join(sorted(ids)).encode()
    return {"images": len(ids), "sha256": hashlib.sha256(text).hexdigest()}


def holdout_ids(out_dir: Path) -> list[str]:
    """The hold-out's image ids, from the labels file ``split_tune_shards`` writes beside its shards."""
    with open(out_dir / HOLDOUT_LABELS, newline="") as f:
        return [row[0] for row in csv.reader(f) if row]


def holdout_originals(shards_dir: Path, competition_data: Path, out_dir: Path) -> tuple[list[Path], list[list[int]]]:
    """The hold-out's images as a submission reads test images, from their full-size originals in
    ``stage_1_test_images/`` (the tune shards hold them resized), with their labels."""
    vocab = Vocabulary.load(shards_dir)
    folder = Path(competition_data) / "stage_1_test_images"
    with open(out_dir / HOLDOUT_LABELS, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    return [image_path(folder, image_id) for image_id, _ in rows], [vocab.encode(codes.split()) for _, codes in rows]


def tuning_classes(shards_dir: Path) -> list[int]:
    """The classes with a positive among the tuning labels (the tune split, fit and hold-out together)."""
    seen = set()
    for tar in split_shards(shards_dir, "tune").tars:
        for _, files in iter_samples(tar):
            seen.update(int(c) for c in decode_labels(files["labels"]))
    return sorted(seen)


def tune_parts(shards_dir: Path, out_dir: Path) -> tuple[SplitShards, SplitShards]:
    """(fit, holdout) as written by ``split_tune_shards``; every rank reads them the same way."""
    source = split_shards(shards_dir, "tune")
    parts = []
    for name in PARTS:
        tar, idx = out_dir / f"{name}-000000.tar", out_dir / f"{name}-000000.idx"
        parts.append(SplitShards([tar], [idx], index_samples(idx), source.shortest_side, source.num_classes))
    return parts[0], parts[1]


def split_tune_shards(shards_dir: Path, out_dir: Path, holdout_fraction: float, seed: int) -> tuple[SplitShards, SplitShards]:
    """(fit, holdout), deterministic from the seed; rewritten on every call (it is cheap)."""
    source = split_shards(shards_dir, "tune")
    samples = sorted(({"__key__": key, **files} for tar in source.tars for key, files in iter_samples(tar)),
                     key=lambda s: s["__key__"])
    order = rng(seed, "tune_holdout").permutation(len(samples))
    n_hold = min(len(samples) - 1, max(1, round(len(samples) * holdout_fraction)))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, picked in zip(PARTS, (order[n_hold:], order[:n_hold])):
        writer = ShardWriter(out_dir, name, 0)
        for i in picked:
            writer.add(samples[i])
        writer.close()
    # the hold-out's labels in tuning_labels.csv's layout: stage-1 submissions are scored on these, not on the
    # images the tune stage trained on
    codes = Vocabulary.load(shards_dir).codes
    atomic_write_csv(out_dir / HOLDOUT_LABELS, None,
                     [(decode_meta(samples[i]["json"])["image_id"],
                       " ".join(codes[c] for c in decode_labels(samples[i]["labels"]))) for i in sorted(order[:n_hold])])
    return tune_parts(shards_dir, out_dir)
