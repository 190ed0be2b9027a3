"""Check every shard against ``manifest.json``, and rebuild the ones that fail.

    python -m preprocessing.verify --config config.yaml [--workers N] [--repair]

Checks sha256, sample counts, that every ``.jpg`` decodes, that every ``.labels``
holds valid class indices and that every ``.idx`` is exactly what DALI's ``wds2idx``
makes of its tar. Prints each problem; exits 1 if there is any. With ``--repair`` it then
rebuilds exactly the shards (and indexes) that failed from the original images, byte for
byte as the manifest records them, and refuses, naming the shard and the reason, where an
original has changed or gone so that a shard can no longer be rebuilt as recorded.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common.cli import command, config_from_args, config_parser
from common.config import Config
from common.errors import UserError
from common.image_checks import ImageProblem, decoding
from common.paths import readable_dir
from common.log import progress
from common.threads import worker_count
from common.shard_format import (EXTENSIONS, MACHINE_EXTENSIONS, SHARD_GLOB, ShardWriter, decode_labels,
                                 decode_machine, file_sha256, iter_samples, read_manifest, write_index)
from preprocessing.build_shards import SKIPPED, Plan, SplitPlan, data_files, make_plan, prepared_samples

log = logging.getLogger(__name__)


def check_sample(where: str, files: dict[str, bytes], num_classes: int, machine: bool = False) -> list[str]:
    """``machine``: the sample's split carries machine labels."""
    problems = []
    missing = [e for e in EXTENSIONS + (MACHINE_EXTENSIONS if machine else ()) if e not in files]
    if missing:
        problems.append(f"{where} lacks {', '.join(missing)}")
    if "jpg" in files:
        try:
            with decoding(), Image.open(io.BytesIO(files["jpg"])) as im:  # the builder's words for a bad image
                im.load()
                if im.format != "JPEG" or im.mode != "RGB":
                    problems.append(f"{where}: image is {im.format} {im.mode}, not an RGB JPEG")
        except ImageProblem as exc:
            problems.append(f"{where}: image does not decode ({exc})")
        except Exception as exc:  # any other decoder failure is a finding too, not a crash
            problems.append(f"{where}: image does not decode ({type(exc).__name__})")
    if "labels" in files:
        try:
            classes = decode_labels(files["labels"])
        except ValueError:
            classes = None
        if classes is None or classes.size == 0:
            problems.append(f"{where}: .labels is not a non-empty int32 list")
        elif classes.min() < 0 or classes.max() >= num_classes:
            problems.append(f"{where}: class index out of range 0..{num_classes - 1}")
    if all(e in files for e in MACHINE_EXTENSIONS):
        try:
            classes, conf = decode_machine(files)
            if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
                problems.append(f"{where}: machine label out of range 0..{num_classes - 1}")
            if not np.all((conf > 0) & (conf <= 1)):
                problems.append(f"{where}: a machine label's confidence is outside (0, 1]")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def check_samples(tar_path: Path, num_classes: int, machine: bool = False) -> tuple[int, list[str]]:
    """Count samples and list what is wrong inside one tar."""
    problems: list[str] = []
    seen: set[str] = set()
    try:
        for key, files in iter_samples(tar_path):
            where = f"{tar_path.name}: sample {key}"
            if key in seen:
                problems.append(f"{where} appears twice")
            seen.add(key)
            problems += check_sample(where, files, num_classes, machine)
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


def check_shard(shards_dir: Path, num_classes: int, machine_splits: tuple, shard: dict) -> list[str]:
    """Everything wrong with one shard and its index (empty when nothing is)."""
    tar_path = shards_dir / shard["name"]
    if not tar_path.is_file():
        return [f"{shard['name']}: missing"]
    problems = []
    if tar_path.stat().st_size != shard["bytes"]:
        problems.append(f"{shard['name']}: {tar_path.stat().st_size} bytes, manifest says {shard['bytes']}")
    if file_sha256(tar_path) != shard["sha256"]:
        problems.append(f"{shard['name']}: sha256 differs from the manifest")
    count, found = check_samples(tar_path, num_classes, shard["split"] in machine_splits)
    problems += found
    if count != shard["samples"]:
        problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
    return problems + check_index(tar_path, shards_dir / shard["index"])


def verify_shards(shards_dir: Path, workers: int = 1) -> tuple[dict[str, list[str]], list[str]]:
    """(problems of each failing shard by name, problems of the folder) after checking every shard."""
    manifest = read_manifest(shards_dir)
    listed = {s["name"] for s in manifest["shards"]}
    folder_problems = [f"{extra}: shard not in the manifest"
                       for extra in sorted(p.name for p in shards_dir.glob(SHARD_GLOB) if p.name not in listed)]
    check = functools.partial(check_shard, shards_dir, manifest["settings"]["num_classes"],
                              tuple(manifest["settings"].get("machine_label_splits", ())))
    with mp.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(check, manifest["shards"]) if pool else map(check, manifest["shards"])
        found = list(progress(log, iterable=results, total=len(manifest["shards"]), unit="shard", desc="verifying"))
    return {s["name"]: p for s, p in zip(manifest["shards"], found) if p}, folder_problems


def verify(shards_dir: Path, workers: int = 1) -> list[str]:
    """Return the list of problems found (empty when all is well)."""
    failing, folder_problems = verify_shards(shards_dir, workers)
    return folder_problems + [p for problems in failing.values() for p in problems]


def repair(cfg: Config, names: list[str], workers: int = 1) -> list[str]:
    """Rebuild the named shards as the manifest records them; returns why each one that could not be was refused."""
    out = cfg.paths.shards
    manifest = read_manifest(out)
    plan = make_plan(cfg, data_files(cfg))
    if plan.fingerprint != manifest.get("fingerprint"):
        raise UserError(f"the label files or data.* settings changed since {out} was built, so its shards cannot be "
                        "rebuilt as recorded: rebuild them all with preprocessing.build_shards --restart")
    records = {s["name"]: s for s in manifest["shards"]}
    splits = {s.name: s for s in plan.splits}
    with open(out / SKIPPED, newline="") as f:
        skipped = {(row["image_id"], row["split"]) for row in csv.DictReader(f)}
    refused = []
    work = Path(tempfile.mkdtemp(prefix=".repair-", dir=out))
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for name in progress(log, iterable=names, unit="shard", desc="repairing"):
            record = records[name]
            reason = _rebuild(cfg, plan, splits[record["split"]], record, skipped, work, pool)
            if reason:
                refused.append(f"{name}: {reason}")
    finally:
        if pool:
            pool.terminate()
            pool.join()
        shutil.rmtree(work, ignore_errors=True)
    return refused


def _rebuild(cfg: Config, plan: Plan, split: SplitPlan, record: dict, skipped: set, work: Path, pool) -> str | None:
    """Rebuild one shard (or only its index, when the tar is intact); None when done, else why not."""
    out = cfg.paths.shards
    tar_path, idx_path = out / record["name"], out / record["index"]
    if tar_path.is_file() and file_sha256(tar_path) == record["sha256"]:
        write_index(tar_path, idx_path)
        return None
    if "positions" not in record:
        return "the manifest predates repairs (no positions); rebuild with preprocessing.build_shards --restart"
    number = int(record["name"][len(record["split"]) + 1:-len(".tar")])
    writer = ShardWriter(work, record["split"], number)
    try:
        for image_id, sample, reason, _ in prepared_samples(cfg, plan, split, *record["positions"], pool):
            if sample is not None:
                writer.add(sample)
            elif (image_id, split.name) not in skipped:
                return f"cannot be rebuilt as recorded: its image {image_id} is now '{reason}'"
        rebuilt = writer.close()
    finally:
        writer.abandon()
    if rebuilt.sha256 != record["sha256"]:
        return ("cannot be rebuilt as recorded: the rebuilt shard's sha256 differs, so an original image under it "
                "has changed; rebuild with preprocessing.build_shards --restart")
    os.replace(work / rebuilt.name, tar_path)
    write_index(tar_path, idx_path)
    return None


@command
def main(argv=None):
    parser = config_parser("python -m preprocessing.verify", __doc__)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that check (and rebuild) shards (default: every CPU this process may use, "
                             "a container's CPU quota included)")
    parser.add_argument("--repair", action="store_true",
                        help="rebuild the shards and indexes that fail, from the original images")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    args.workers = worker_count(args.workers)
    cfg = config_from_args(args)
    readable_dir(cfg.paths.shards, "paths.shards")
    failing, folder_problems = verify_shards(cfg.paths.shards, args.workers)
    for p in folder_problems + [p for problems in failing.values() for p in problems]:
        log.info(p)
    if failing and args.repair:
        refused = repair(cfg, sorted(failing), args.workers)
        still, _ = verify_shards(cfg.paths.shards, args.workers)
        repaired = sorted(set(failing) - set(still))
        log.info("repaired %d shard(s)%s", len(repaired), f": {', '.join(repaired)}" if repaired else "")
        for line in refused:
            log.error("%s", line)
        failing = still
    problems = len(folder_problems) + sum(len(p) for p in failing.values())
    if problems:
        log.error("%d problem(s) found%s", problems, "" if args.repair else "; --repair rebuilds failing shards")
        sys.exit(1)
    log.info("all shards in %s verified", cfg.paths.shards)


if __name__ == "__main__":
    main()
