"""The shard format contract between the shard builder (writer) and the loaders (readers).

A split's shards are ``<split>-NNNNNN.tar`` with a DALI index ``<split>-NNNNNN.idx``
beside each; ``manifest.json`` lists them with their sample counts. Each sample is
``<id>.jpg`` (RGB baseline JPEG), ``<id>.labels`` (class indices, little-endian int32)
and ``<id>.json`` (``{"image_id": ..., "labels": [label codes]}``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

MANIFEST = "manifest.json"
EXTENSIONS = ("jpg", "labels", "json")
SPLITS = ("train", "val", "tune")


@dataclass(frozen=True)
class SplitShards:
    tars: list[Path]
    indexes: list[Path]
    samples: int
    shortest_side: int
    num_classes: int


def read_manifest(shards_dir: Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"no manifest at {path}: run preprocessing.build_shards first")
    return json.loads(path.read_text())


def split_shards(shards_dir: Path, split: str) -> SplitShards:
    """The tar and index paths of one split, in order, as the manifest lists them."""
    manifest = read_manifest(shards_dir)
    mine = [s for s in manifest["shards"] if s["split"] == split]
    if not mine:
        raise UserError(f"{shards_dir} has no '{split}' shards")
    folder = Path(shards_dir)
    return SplitShards([folder / s["name"] for s in mine], [folder / s["index"] for s in mine],
                       sum(s["samples"] for s in mine), manifest["settings"]["shortest_side"],
                       manifest["settings"]["num_classes"])
