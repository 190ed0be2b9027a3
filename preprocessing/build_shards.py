"""Pack the Kaggle training data into globally shuffled WebDataset shards with DALI indexes.

    python -m preprocessing.build_shards --config config.yaml [--set k=v ...] [--workers N]

Writes into ``paths.shards``: ``{train,val,tune}-NNNNNN.tar`` + ``.idx``, ``classes.csv``,
``skipped.csv`` (every labeled image that is in no shard, with the reason) and, last,
``manifest.json``. A killed run resumes where it stopped when started again with the
same command; the result is byte-identical to an uninterrupted run with any --workers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_csv, atomic_write_text
from common.cli import command, config_from_args, config_parser
from common.config import Config, ConfigError, require_file
from common.errors import UserError
from common.images import ImageProblem, read_image_file
from common.log import progress
from common.shard_format import (INDEX_GLOB, MANIFEST, SHARD_GLOB, SPLITS, ShardWriter, encode_sample,
                                 read_manifest, write_manifest)
from common.vocab import Vocabulary
from preprocessing.images import prepare_image
from preprocessing.labels import LabelProblems, LabelTable, read_human_labels, read_tuning_labels
from preprocessing.splits import permutation, split_train_val

log = logging.getLogger(__name__)

SKIPPED = "skipped.csv"
STATE = ".build_state.json"
FORMAT_VERSION = 1


@dataclass
class SplitPlan:
    """One split's images in the order they will be written."""
    name: str
    image_dir: Path
    table: LabelTable
    order: np.ndarray  # indices into table, shuffled


@dataclass
class Plan:
    vocab: Vocabulary
    splits: list[SplitPlan]
    pre_skipped: list[tuple[str, str, str]]  # (image_id, split, reason) known before any image is read
    label_reports: dict[str, LabelProblems]
    fingerprint: str = ""


@dataclass
class BuildState:
    """What is finished; saved atomically after every shard so a killed run can resume."""
    fingerprint: str
    shards: list[dict] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)  # rows for images before the last shard's end
    position: dict[str, int] = field(default_factory=dict)  # split -> next index into its order
    counts: dict[str, int] = field(default_factory=dict)  # packed_as_is / reencoded

    @classmethod
    def load(cls, folder: Path, fingerprint: str, restart: bool) -> "BuildState":
        path = folder / STATE
        if path.exists() and not restart:
            data = json.loads(path.read_text())
            if data.get("fingerprint") != fingerprint:
                raise UserError(f"{folder} holds an unfinished build with other settings or input; "
                                "run again with --restart to discard it")
            return cls(**data)
        return cls(fingerprint)

    def save(self, folder: Path) -> None:
        atomic_write_text(folder / STATE, json.dumps(self.__dict__))


def data_files(cfg: Config) -> dict[str, Path]:
    comp = cfg.paths.competition_data
    files = {name: require_file(comp / name, "competition file") for name in (
        "classes-trainable.csv", "class-descriptions.csv", "train_human_labels.csv", "tuning_labels.csv")}
    for folder in (cfg.paths.original_images / "train", comp / "stage_1_test_images"):
        if not folder.is_dir():
            raise ConfigError(f"image folder not found: {folder}")
    return files


def make_plan(cfg: Config, files: dict[str, Path]) -> Plan:
    """Read labels, split and shuffle; nothing here touches an image."""
    vocab = Vocabulary.from_kaggle(files["classes-trainable.csv"], files["class-descriptions.csv"])
    if not len(vocab):
        raise UserError(f"{files['classes-trainable.csv']} lists no class")
    train_table, train_report = read_human_labels(files["train_human_labels.csv"], vocab)
    tune_table, tune_report = read_tuning_labels(files["tuning_labels.csv"], vocab)
    pre = [(i, "train", "bad id") for i in train_report.bad_ids]
    pre += [(i, "train", "no trainable label") for i in train_report.no_label_ids]
    pre += [(i, "tune", "bad id") for i in tune_report.bad_ids]
    pre += [(i, "tune", "no trainable label") for i in tune_report.no_label_ids]
    train_order, val_order = split_train_val(len(train_table), cfg.data.val_fraction, cfg.data.seed)
    train_dir = cfg.paths.original_images / "train"
    splits = [SplitPlan("train", train_dir, train_table, train_order),
              SplitPlan("val", train_dir, train_table, val_order),
              SplitPlan("tune", cfg.paths.competition_data / "stage_1_test_images", tune_table,
                        permutation(len(tune_table), cfg.data.seed, "tune"))]
    plan = Plan(vocab, splits, pre, {"train": train_report, "tune": tune_report})
    plan.fingerprint = fingerprint(cfg, plan)
    return plan


def shard_settings(cfg: Config) -> dict:
    keys = ("shortest_side", "jpeg_quality", "val_fraction", "seed", "shard_max_samples",
            "shard_max_bytes", "reduced_decode")
    return {k: getattr(cfg.data, k) for k in keys}


def fingerprint(cfg: Config, plan: Plan) -> str:
    """Changes whenever anything that shapes the shards changes: settings, classes, labels, order."""
    h = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, **shard_settings(cfg)}, sort_keys=True).encode())
    h.update("\n".join(plan.vocab.codes).encode())
    for s in plan.splits:
        h.update(s.name.encode() + str(s.image_dir).encode())
        h.update(np.asarray(s.order, dtype=np.int64).tobytes())
        h.update("\n".join(s.table.image_ids).encode())
        h.update(s.table.offsets.tobytes() + s.table.classes.tobytes())
    return h.hexdigest()


def _prepare_one(task: tuple[str, int, int, bool]) -> tuple[bytes | None, str | None, bool]:
    """Worker: read and convert one image. Returns (jpeg, skip_reason, packed_as_is)."""
    path, side, quality, reduced = task
    try:
        jpeg, as_is = prepare_image(read_image_file(path), side, quality, reduced)
    except ImageProblem as exc:
        return None, str(exc), False
    return jpeg, None, as_is


def prepared_samples(cfg: Config, plan: Plan, split: SplitPlan, start: int, end: int, pool):
    """``(image_id, sample or None, skip reason or None, packed_as_is)`` for the images at positions
    ``start:end`` of the split's order, in that order whatever the number of workers."""
    positions = range(start, end)
    # ids were checked against PLAIN_ID when the labels were read
    tasks = ((str(split.image_dir / f"{split.table.image_ids[split.order[p]]}.jpg"), cfg.data.shortest_side,
              cfg.data.jpeg_quality, cfg.data.reduced_decode) for p in positions)
    results = pool.imap(_prepare_one, tasks, chunksize=8) if pool else map(_prepare_one, tasks)
    for position, (jpeg, reason, as_is) in zip(positions, results):
        i = split.order[position]
        image_id = split.table.image_ids[i]
        if reason is not None:
            yield image_id, None, reason, False
        else:
            classes = split.table.labels(i)
            yield image_id, encode_sample(image_id, jpeg, classes, plan.vocab.decode(classes)), None, as_is


def build_split(cfg: Config, plan: Plan, split: SplitPlan, state: BuildState, pool, bar) -> None:
    out = cfg.paths.shards
    start = state.position.get(split.name, 0)
    done_shards = sum(1 for s in state.shards if s["split"] == split.name)
    writer = ShardWriter(out, split.name, done_shards, cfg.data.shard_max_samples, cfg.data.shard_max_bytes)
    pending_skips: list[list[str]] = []
    pending_counts: Counter = Counter()

    def finish_shard(end: int):
        """Close the shard that holds the images at positions [its start, end) of the split's order."""
        record = writer.close(positions=(state.position.get(split.name, 0), end))
        state.shards.append(record.to_dict())
        state.skipped.extend(pending_skips)
        state.position[split.name] = end
        for k, v in pending_counts.items():
            state.counts[k] = state.counts.get(k, 0) + v
        state.save(out)
        pending_skips.clear()
        pending_counts.clear()

    try:
        samples = prepared_samples(cfg, plan, split, start, len(split.order), pool)
        for position, (image_id, sample, reason, as_is) in enumerate(samples, start=start):
            bar.update(1)
            if reason is not None:
                pending_skips.append([image_id, split.name, reason])
                bar.set_postfix(skipped=len(state.skipped) + len(pending_skips), refresh=False)
                continue
            if writer.would_overflow(sample):
                finish_shard(position)
            writer.add(sample)
            pending_counts["packed_as_is" if as_is else "reencoded"] += 1
        if writer.is_open:
            finish_shard(len(split.order))
        else:  # nothing left but skips
            state.skipped.extend(pending_skips)
            state.position[split.name] = len(split.order)
            state.save(out)
    finally:
        writer.abandon()


def class_counts(split: SplitPlan, num_classes: int) -> list[int]:
    """Positive labels per class over a split's images (the fallback labels at inference come from these)."""
    in_split = np.zeros(len(split.table), dtype=bool)
    in_split[split.order] = True
    per_pair = np.repeat(in_split, np.diff(split.table.offsets))
    return np.bincount(split.table.classes[per_pair], minlength=num_classes).tolist()


def write_reports(cfg: Config, plan: Plan, state: BuildState, seconds: float) -> dict:
    out = cfg.paths.shards
    rows = sorted(plan.pre_skipped) + sorted(tuple(r) for r in state.skipped)
    atomic_write_csv(out / SKIPPED, ["image_id", "split", "reason"], rows)
    splits = {}
    for name in SPLITS:
        mine = [s for s in state.shards if s["split"] == name]
        splits[name] = {"shards": len(mine), "samples": sum(s["samples"] for s in mine),
                        "bytes": sum(s["bytes"] for s in mine)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "settings": {**shard_settings(cfg), "num_classes": len(plan.vocab)},
        "classes": "classes.csv",
        "splits": splits,
        "shards": state.shards,
        "skipped": dict(sorted(Counter(r[2] for r in rows).items())),
        "images": {k: state.counts.get(k, 0) for k in ("packed_as_is", "reencoded")},
        "labels": {k: v.summary() for k, v in plan.label_reports.items()},
        "class_counts": {"train": class_counts(plan.splits[0], len(plan.vocab))},
        "build_seconds": round(seconds, 1),
    }
    write_manifest(out, manifest)
    return manifest


def cleanup_temporaries(folder: Path) -> None:
    for f in folder.glob(".*.tmp"):
        f.unlink()


def log_summary(manifest: dict, out: Path) -> None:
    log.info("shards in %s:", out)
    for name, s in manifest["splits"].items():
        log.info(f"  {name:5s} {s['samples']:>9,d} images in {s['shards']:>4d} shards, {s['bytes'] / 1e9:.2f} GB")
    skipped = manifest["skipped"]
    total = sum(skipped.values())
    detail = ", ".join(f"{k}: {v}" for k, v in skipped.items())
    log.info(f"  skipped {total:,d} labeled images{f' ({detail})' if detail else ''}; see {out / SKIPPED}")
    bad_rows = sum(len(v["malformed_rows"]) for v in manifest["labels"].values())
    if bad_rows:
        log.info(f"  {bad_rows} malformed label rows were skipped; see 'labels' in {out / MANIFEST}")


def report_malformed(reports: dict[str, LabelProblems], files: dict[str, Path]) -> None:
    sources = {"train": files["train_human_labels.csv"], "tune": files["tuning_labels.csv"]}
    for split, report in reports.items():
        for line, reason in report.malformed_rows[:20]:
            log.warning("%s line %d: %s; row skipped", sources[split], line, reason)
        if len(report.malformed_rows) > 20:
            log.warning("... and %d more malformed rows", len(report.malformed_rows) - 20)


def build_shards(cfg: Config, workers: int | None = None, restart: bool = False) -> dict:
    """The whole job; returns the manifest. Safe to call again after a crash."""
    files = data_files(cfg)
    started = time.time()
    out = cfg.paths.shards
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(cfg, files)
    report_malformed(plan.label_reports, files)
    manifest_path = out / MANIFEST
    if manifest_path.exists() and not restart:
        manifest = read_manifest(out)
        if manifest.get("fingerprint") == plan.fingerprint:
            log.info("%s is already complete and up to date", out)
            return manifest
        raise UserError(f"{out} holds shards built from other settings or input; "
                        "run again with --restart to rebuild them")
    if restart:
        for f in [*out.glob(SHARD_GLOB), *out.glob(INDEX_GLOB), manifest_path, out / SKIPPED,
                  out / STATE]:
            f.unlink(missing_ok=True)
    cleanup_temporaries(out)
    state = BuildState.load(out, plan.fingerprint, restart)
    plan.vocab.save(out)
    remaining = sum(len(s.order) - state.position.get(s.name, 0) for s in plan.splits)
    workers = workers or os.cpu_count() or 1
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with progress(log, total=remaining, unit="img", desc="building shards", smoothing=0.05) as bar:
            for split in plan.splits:
                build_split(cfg, plan, split, state, pool, bar)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    manifest = write_reports(cfg, plan, state, time.time() - started)
    (out / STATE).unlink(missing_ok=True)
    log_summary(manifest, out)
    return manifest


@command
def main(argv=None):
    parser = config_parser("python -m preprocessing.build_shards", __doc__)
    parser.add_argument("--workers", type=int, default=None,
                        help="image worker processes (default: all cores); the output does not depend on it")
    parser.add_argument("--restart", action="store_true",
                        help="discard an unfinished or outdated build in paths.shards and start over")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    cfg = config_from_args(args)
    build_shards(cfg, args.workers, args.restart)


if __name__ == "__main__":
    main()
