"""Write one split's samples into numbered WebDataset shards, each with its DALI index.

A shard is written under a temporary name and renamed only once complete, then its
``.idx`` is made by DALI's own ``wds2idx``. Tar headers carry fixed metadata so the
bytes depend only on the samples.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from wds2idx import IndexCreator

from common.atomic import tmp_name
from common.shard_format import EXTENSIONS

TAR_BLOCK = 512


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def encode_sample(image_id: str, jpeg: bytes, classes: np.ndarray, codes: list[str]) -> dict:
    """The three files of one sample: image, raw little-endian int32 classes, JSON metadata."""
    return {
        "__key__": image_id,
        "jpg": jpeg,
        "labels": np.asarray(classes, dtype="<i4").tobytes(),
        "json": json.dumps({"image_id": image_id, "labels": codes}, separators=(",", ":")).encode(),
    }


def tar_size(sample: dict) -> int:
    """Bytes a sample takes in the tar: a header block per file plus its padded data."""
    return sum(TAR_BLOCK + -(-len(sample[e]) // TAR_BLOCK) * TAR_BLOCK for e in EXTENSIONS)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_index(tar_path: Path, idx_path: Path) -> None:
    """DALI's ``wds2idx`` index, written atomically."""
    tmp = tmp_name(idx_path)
    with IndexCreator(str(tar_path), str(tmp), verbose=False) as creator:
        creator.create_index()
    os.replace(tmp, idx_path)


@dataclass
class ShardRecord:
    name: str
    split: str
    samples: int
    bytes: int
    sha256: str
    index: str

    def to_dict(self) -> dict:
        return asdict(self)


class ShardWriter:
    """Packs samples into ``<split>-NNNNNN.tar`` until a sample or byte limit would be passed."""

    END_OF_ARCHIVE = 2 * TAR_BLOCK
    RECORD = 20 * TAR_BLOCK  # tarfile pads a stream to whole 10 KiB records

    def __init__(self, folder: Path, split: str, first_number: int, max_samples: int, max_bytes: int):
        self.folder, self.split = Path(folder), split
        self.number = first_number
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self._file = self._tar = None
        self.samples = self.bytes = 0

    def would_overflow(self, sample: dict) -> bool:
        size = self.bytes + tar_size(sample) + self.END_OF_ARCHIVE
        size = -(-size // self.RECORD) * self.RECORD
        return self.samples > 0 and (self.samples >= self.max_samples or size > self.max_bytes)

    def add(self, sample: dict) -> None:
        if self._tar is None:
            self._file = open(tmp_name(self.folder / shard_name(self.split, self.number)), "wb")
            self._tar = wds.TarWriter(self._file, user="", group="", mode=0o444, mtime=0, encoder=False)  # int mtime: no PAX header
        self._tar.write(sample)
        self.samples += 1
        self.bytes += tar_size(sample)

    @property
    def is_open(self) -> bool:
        return self._tar is not None

    def close(self) -> ShardRecord:
        """Finish the current shard: flush, fsync, rename, index. Returns its record."""
        name = shard_name(self.split, self.number)
        final = self.folder / name
        self._tar.close()  # closes the tar stream, not our file
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(tmp_name(final), final)
        write_index(final, self.folder / index_name(name))
        record = ShardRecord(name, self.split, self.samples, final.stat().st_size, file_sha256(final),
                             index_name(name))
        self._file = self._tar = None
        self.samples = self.bytes = 0
        self.number += 1
        return record

    def abandon(self) -> None:
        if self._file is not None:
            self._file.close()
            tmp_name(self.folder / shard_name(self.split, self.number)).unlink(missing_ok=True)
        self._file = self._tar = None
