"""The shard format: the one module that writes it and reads it back.

A split's shards are ``<split>-NNNNNN.tar`` with a DALI index ``<split>-NNNNNN.idx`` beside
each; ``manifest.json`` lists them with their sample counts, sizes and sha256. Each sample
is ``<id>.jpg`` (RGB baseline JPEG), ``<id>.labels`` (class indices, little-endian int32)
and ``<id>.json`` (``{"image_id": ..., "labels": [label codes]}``); shards built with machine labels
(``data.machine_labels``, format 3) add ``<id>.machine_labels`` (class indices, int32) and
``<id>.machine_conf`` (their confidences, little-endian float32), empty for an image with none. Shards
of format 2 are format 3 without them. A shard is written under
a temporary name and renamed only once complete; its tar headers carry fixed metadata, so
its bytes depend only on its samples.

The tar is written with the standard library's ``tarfile``, exactly as ``webdataset.TarWriter`` writes it
(its files in sorted order, the same headers: a test compares the bytes), because importing
``webdataset`` imports torch, 1.5 s that every small build and every ``--help`` would wait for.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from common.atomic import atomic_write_text, tmp_name
from common.errors import UserError, writing

MANIFEST = "manifest.json"
EXTENSIONS = ("jpg", "labels", "json")
MACHINE_EXTENSIONS = ("machine_labels", "machine_conf")
FORMAT_VERSION = 3  # 3: optional machine labels; 2: shards cut up front, a fixed number of images each
SPLITS = ("train", "val", "tune")
SHARD_GLOB = "*-[0-9]*.tar"
INDEX_GLOB = "*-[0-9]*.idx"
LABEL_DTYPE = "<i4"
CONFIDENCE_DTYPE = "<f4"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def encode_sample(image_id: str, jpeg: bytes, classes, codes: list[str], machine=None) -> dict:
    """The files of one sample: image, raw little-endian int32 classes, JSON metadata and, where ``machine`` is
    given (``(classes, confidences)``, maybe empty), the machine labels."""
    sample = {
        "__key__": image_id,
        "jpg": jpeg,
        "labels": np.asarray(classes, dtype=LABEL_DTYPE).tobytes(),
        "json": json.dumps({"image_id": image_id, "labels": codes}, separators=(",", ":")).encode(),
    }
    if machine is not None:
        sample["machine_labels"] = np.asarray(machine[0], dtype=LABEL_DTYPE).tobytes()
        sample["machine_conf"] = np.asarray(machine[1], dtype=CONFIDENCE_DTYPE).tobytes()
    return sample


def decode_labels(raw: bytes) -> np.ndarray:
    """A ``.labels`` file's class indices; ValueError when it is not a whole number of int32."""
    if len(raw) % 4:
        raise ValueError(f".labels holds {len(raw)} bytes, not a whole number of int32")
    return np.frombuffer(raw, dtype=LABEL_DTYPE)


def decode_machine(files: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """A sample's machine labels and confidences; ValueError when the two do not pair up."""
    classes = decode_labels(files["machine_labels"])
    raw = files["machine_conf"]
    if len(raw) != 4 * len(classes):
        raise ValueError(f".machine_conf holds {len(raw)} bytes for {len(classes)} machine labels")
    return classes, np.frombuffer(raw, dtype=CONFIDENCE_DTYPE)


def decode_meta(raw: bytes) -> dict:
    """A ``.json`` file's metadata (DALI hands it over zero-padded: the padding is dropped)."""
    return json.loads(bytes(raw).rstrip(b"\0"))


def iter_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample in file order; a sample's files are adjacent, so one sample
    is held at a time. Raises tarfile.TarError or OSError when the tar cannot be read."""
    with tarfile.open(tar_path) as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.partition(".")
            if k != key and files:
                yield key, files
                files = {}
            key = k
            files[ext] = tar.extractfile(member).read()
        if files:
            yield key, files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_index(tar_path: Path, idx_path: Path) -> None:
    """DALI's own ``wds2idx`` index, written atomically."""
    from wds2idx import IndexCreator  # shipped with DALI

    tmp = tmp_name(idx_path)
    try:
        with writing(idx_path), IndexCreator(str(tar_path), str(tmp), verbose=False) as creator:
            creator.create_index()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, idx_path)


def index_samples(idx_path: Path) -> int:
    """The sample count in a DALI index's header line (``v1.2 <samples>``)."""
    return int(Path(idx_path).read_text().split(maxsplit=2)[1])


@dataclass
class ShardRecord:
    """One shard as the manifest lists it. ``positions``: the shard holds the images at positions
    [start, end) of its split's shuffled order, less the skipped ones (so it can be rebuilt alone)."""
    name: str
    split: str
    samples: int
    bytes: int
    sha256: str
    index: str
    positions: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.positions is None:
            del d["positions"]
        else:
            d["positions"] = [int(p) for p in self.positions]
        return d


class ShardWriter:
    """Packs samples into ``<split>-NNNNNN.tar``; which samples go into which shard the caller decides."""

    def __init__(self, folder: Path, split: str, number: int):
        self.folder, self.split = Path(folder), split
        self.number = number
        self._file = self._tar = None
        self.samples = 0

    def add(self, sample: dict) -> None:
        final = self.folder / shard_name(self.split, self.number)
        with writing(final):
            if self._tar is None:
                self._file = open(tmp_name(final), "wb")
                self._tar = tarfile.open(fileobj=self._file, mode="w|")
            for ext in sorted(e for e in sample if not e.startswith("_")):
                data = sample[ext]
                # fixed metadata (int mtime: no PAX header), so the bytes depend only on the sample
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
                self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    @property
    def is_open(self) -> bool:
        return self._tar is not None

    def close(self, positions: tuple[int, int] | None = None) -> ShardRecord:
        """Finish the current shard: flush, fsync, rename, index. Returns its record."""
        name = shard_name(self.split, self.number)
        final = self.folder / name
        with writing(final):
            self._tar.close()  # closes the tar stream, not our file
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        os.replace(tmp_name(final), final)
        write_index(final, self.folder / index_name(name))
        record = ShardRecord(name, self.split, self.samples, final.stat().st_size, file_sha256(final),
                             index_name(name), positions)
        self._file = self._tar = None
        self.samples = 0
        self.number += 1
        return record

    def abandon(self) -> None:
        """Drop an unfinished shard. Closing may fail as writing did (a full disk): the file goes anyway, and
        the error that brought us here is the one to report."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._tar.close()
            with contextlib.suppress(OSError):
                self._file.close()
            tmp_name(self.folder / shard_name(self.split, self.number)).unlink(missing_ok=True)
        self._file = self._tar = None


def read_manifest(shards_dir: Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"no manifest at {path}: run preprocessing.build_shards first")
    return json.loads(path.read_text())


def write_manifest(shards_dir: Path, manifest: dict) -> None:
    atomic_write_text(Path(shards_dir) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


@dataclass(frozen=True)
class SplitShards:
    tars: list[Path]
    indexes: list[Path]
    samples: int
    shortest_side: int
    num_classes: int
    machine_labels: bool = False  # the samples carry MACHINE_EXTENSIONS


def split_shards(shards_dir: Path, split: str) -> SplitShards:
    """The tar and index paths of one split, in order, as the manifest lists them."""
    manifest = read_manifest(shards_dir)
    mine = [s for s in manifest["shards"] if s["split"] == split]
    if not mine:
        raise UserError(f"{shards_dir} has no '{split}' shards")
    folder = Path(shards_dir)
    return SplitShards([folder / s["name"] for s in mine], [folder / s["index"] for s in mine],
                       sum(s["samples"] for s in mine), manifest["settings"]["shortest_side"],
                       manifest["settings"]["num_classes"],
                       split in manifest["settings"].get("machine_label_splits", ()))
