"""Check every shard against ``manifest.json``.

    python -m preprocessing.verify --config config.yaml

Checks sha256, sample counts, that every ``.jpg`` decodes, that every ``.labels``
holds valid class indices and that every ``.idx`` is exactly what DALI's ``wds2idx``
makes of its tar. Prints each problem; exits 1 if there is any.
"""
from __future__ import annotations

import io
import logging
import sys
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

from common.cli import command, config_from_args, config_parser
from common.log import progress
from common.shard_format import (EXTENSIONS, SHARD_GLOB, decode_labels, file_sha256, iter_samples, read_manifest,
                                 write_index)

log = logging.getLogger(__name__)


def check_sample(where: str, files: dict[str, bytes], num_classes: int) -> list[str]:
    problems = []
    missing = [e for e in EXTENSIONS if e not in files]
    if missing:
        problems.append(f"{where} lacks {', '.join(missing)}")
    if "jpg" in files:
        try:
            with Image.open(io.BytesIO(files["jpg"])) as im:
                im.load()
                if im.format != "JPEG" or im.mode != "RGB":
                    problems.append(f"{where}: image is {im.format} {im.mode}, not an RGB JPEG")
        except Exception as exc:  # any decoder failure is a finding, not a crash
            problems.append(f"{where}: image does not decode ({exc})")
    if "labels" in files:
        try:
            classes = decode_labels(files["labels"])
        except ValueError:
            classes = None
        if classes is None or classes.size == 0:
            problems.append(f"{where}: .labels is not a non-empty int32 list")
        elif classes.min() < 0 or classes.max() >= num_classes:
            problems.append(f"{where}: class index out of range 0..{num_classes - 1}")
    return problems


def check_samples(tar_path: Path, num_classes: int) -> tuple[int, list[str]]:
    """Count samples and list what is wrong inside one tar."""
    problems: list[str] = []
    seen: set[str] = set()
    try:
        for key, files in iter_samples(tar_path):
            where = f"{tar_path.name}: sample {key}"
            if key in seen:
                problems.append(f"{where} appears twice")
            seen.add(key)
            problems += check_sample(where, files, num_classes)
    except (tarfile.TarError, OSError) as exc:
        return len(seen), problems + [f"{tar_path.name}: cannot read tar ({exc})"]
    return len(seen), problems


def check_index(tar_path: Path, idx_path: Path) -> list[str]:
    if not idx_path.is_file():
        return [f"{idx_path.name}: index missing"]
    with tempfile.TemporaryDirectory() as tmp:
        expected = Path(tmp) / "expected.idx"
        write_index(tar_path, expected)
        if expected.read_bytes() != idx_path.read_bytes():
            return [f"{idx_path.name}: does not match its tar"]
    return []


def verify(shards_dir: Path) -> list[str]:
    """Return the list of problems found (empty when all is well)."""
    manifest = read_manifest(shards_dir)
    num_classes = manifest["settings"]["num_classes"]
    problems: list[str] = []
    listed = {s["name"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in shards_dir.glob(SHARD_GLOB) if p.name not in listed):
        problems.append(f"{extra}: shard not in the manifest")
    for shard in progress(log, iterable=manifest["shards"], unit="shard", desc="verifying"):
        tar_path = shards_dir / shard["name"]
        if not tar_path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        if tar_path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['name']}: {tar_path.stat().st_size} bytes, manifest says {shard['bytes']}")
        if file_sha256(tar_path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
        count, found = check_samples(tar_path, num_classes)
        problems += found
        if count != shard["samples"]:
            problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
        problems += check_index(tar_path, shards_dir / shard["index"])
    return problems


@command
def main(argv=None):
    parser = config_parser("python -m preprocessing.verify", __doc__)
    cfg = config_from_args(parser.parse_args(argv))
    problems = verify(cfg.paths.shards)
    for p in problems:
        log.info(p)
    if problems:
        log.error("%d problem(s) found", len(problems))
        sys.exit(1)
    log.info("all shards in %s verified", cfg.paths.shards)


if __name__ == "__main__":
    main()
