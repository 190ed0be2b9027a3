"""Pack the Kaggle training data into globally shuffled WebDataset shards with DALI indexes.

    python -m preprocessing.build_shards --config config.yaml [--set k=v ...] [--workers N]

Writes into ``paths.shards``: ``{train,val,tune}-NNNNNN.tar`` + ``.idx``, ``classes.csv``,
``skipped.csv`` (every labeled image that is in no shard, with the reason) and, last,
``manifest.json``. Each split's shuffled order is cut up front into shards of
``data.shard_max_samples`` images (fewer where images are skipped), and each worker process
owns whole shards: it reads, converts, writes, renames, hashes and indexes one, then leaves a
small record of it. A killed run resumes from those records when started again with the same
command; the result is byte-identical to an uninterrupted run with any --workers.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import multiprocessing as mp
import shutil
import signal
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_csv, atomic_write_text
from common.cli import command, config_from_args, config_parser
from common.config import Config, ConfigError
from common.errors import UserError
from common.paths import readable_dir, require_file, writable_dir
from common.image_checks import ImageProblem, read_image_file
from common.log import progress
from common.threads import worker_count
from common.shard_format import (FORMAT_VERSION, INDEX_GLOB, MANIFEST, SHARD_GLOB, SPLITS, ShardWriter,
                                 encode_sample, read_manifest, shard_name, write_manifest)
from common.vocab import Vocabulary
from preprocessing.resize import prepare_image
from preprocessing.labels import (LabelProblems, LabelTable, MachineLabels, read_human_labels, read_machine_labels,
                                  read_tuning_labels)
from preprocessing.splits import permutation, split_train_val

log = logging.getLogger(__name__)

SKIPPED = "skipped.csv"
RECORDS = ".records"  # one small JSON per finished shard: what resuming and the manifest are made of
# hashed into the fingerprint: how shards are cut (2: up front, a fixed number of images each). Machine labels
# (format 3) enter it only when built with them, so a format-2 build stays up to date for a format-3 builder.
CUT_VERSION = 2
MACHINE_LABEL_SPLITS = ("train", "val")  # the splits cut from train_human_labels.csv


@dataclass
class SplitPlan:
    """One split's images in the order they will be written."""
    name: str
    image_dir: Path
    table: LabelTable
    order: np.ndarray  # indices into table, shuffled
    machine: MachineLabels | None = None  # aligned with table, where the split carries machine labels

    def labels(self, vocab: Vocabulary, i: int) -> dict:
        """Image ``i``'s labels, as ``encode_sample`` takes them (plain lists: a job carries them to a worker)."""
        classes = self.table.labels(i)
        machine = self.machine.labels(i) if self.machine else None
        return {"classes": classes.tolist(), "codes": vocab.decode(classes),
                "machine": (machine[0].tolist(), machine[1].tolist()) if machine else None}


@dataclass
class Plan:
    vocab: Vocabulary
    splits: list[SplitPlan]
    pre_skipped: list[tuple[str, str, str]]  # (image_id, split, reason) known before any image is read
    label_reports: dict[str, LabelProblems]
    fingerprint: str = ""


@dataclass(frozen=True)
class ShardJob:
    """Everything one worker needs to build one shard (picklable, independent of every other shard)."""
    folder: str
    split: str
    number: int
    positions: tuple[int, int]  # [start, end) in the split's shuffled order
    items: list[tuple[str, str, dict]]  # (image id, path, labels: SplitPlan.labels)
    shortest_side: int
    quality: int
    reduced_decode: bool
    fingerprint: str

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)


def data_files(cfg: Config) -> dict[str, Path]:
    comp = readable_dir(cfg.paths.competition_data, "paths.competition_data")
    files = {name: require_file(comp / name, "competition file") for name in (
        "classes-trainable.csv", "class-descriptions.csv", "train_human_labels.csv", "tuning_labels.csv")}
    readable_dir(cfg.paths.original_images, "paths.original_images")
    if cfg.data.machine_labels:
        files["train_machine_labels.csv"] = require_file(comp / "train_machine_labels.csv",
                                                         "competition file (data.machine_labels is true)")
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
    reports = {"train": train_report, "tune": tune_report}
    machine = None
    if cfg.data.machine_labels:
        machine, reports["machine"] = read_machine_labels(files["train_machine_labels.csv"], vocab, train_table)
    train_dir = cfg.paths.original_images / "train"
    splits = [SplitPlan("train", train_dir, train_table, train_order, machine),
              SplitPlan("val", train_dir, train_table, val_order, machine),
              SplitPlan("tune", cfg.paths.competition_data / "stage_1_test_images", tune_table,
                        permutation(len(tune_table), cfg.data.seed, "tune"))]
    plan = Plan(vocab, splits, pre, reports)
    plan.fingerprint = fingerprint(cfg, plan)
    return plan


def shard_settings(cfg: Config) -> dict:
    keys = ("shortest_side", "jpeg_quality", "val_fraction", "seed", "shard_max_samples", "reduced_decode")
    # machine_labels only when on: a build without them has the settings (and fingerprint) it had before them
    return {k: getattr(cfg.data, k) for k in keys} | ({"machine_labels": True} if cfg.data.machine_labels else {})


def fingerprint(cfg: Config, plan: Plan) -> str:
    """Changes whenever anything that shapes the shards changes: settings, classes, labels, order."""
    h = hashlib.sha256(json.dumps({"v": CUT_VERSION, **shard_settings(cfg)}, sort_keys=True).encode())
    h.update("\n".join(plan.vocab.codes).encode())
    for s in plan.splits:
        h.update(s.name.encode() + str(s.image_dir).encode())
        h.update(np.asarray(s.order, dtype=np.int64).tobytes())
        h.update("\n".join(s.table.image_ids).encode())
        h.update(s.table.offsets.tobytes() + s.table.classes.tobytes())
        if s.machine:
            h.update(s.machine.offsets.tobytes() + s.machine.classes.tobytes() + s.machine.confidences.tobytes())
    return h.hexdigest()


def shard_bounds(cfg: Config, split: SplitPlan) -> list[tuple[int, int]]:
    """The split's shards, cut up front: shard k holds the images at positions [k n, (k + 1) n) of its order."""
    n = cfg.data.shard_max_samples
    return [(k * n, min((k + 1) * n, len(split.order))) for k in range(math.ceil(len(split.order) / n))]


def shard_jobs(cfg: Config, plan: Plan, split: SplitPlan, skip: set):
    """The jobs of the split's shards not in ``skip`` (``(split, number)`` of finished ones), made one at a time."""
    for number, (start, end) in enumerate(shard_bounds(cfg, split)):
        if (split.name, number) in skip:
            continue
        # ids were checked against PLAIN_ID when the labels were read
        items = [(split.table.image_ids[i], str(split.image_dir / f"{split.table.image_ids[i]}.jpg"),
                  split.labels(plan.vocab, i)) for i in split.order[start:end]]
        yield ShardJob(str(cfg.paths.shards), split.name, number, (start, end), items, cfg.data.shortest_side, cfg.data.jpeg_quality, cfg.data.reduced_decode, plan.fingerprint)


def prepare_one(path: str, side: int, quality: int, reduced: bool) -> tuple[bytes | None, str | None, bool]:
    """Read and convert one image: (jpeg, skip reason, packed as is)."""
    try:
        jpeg, as_is = prepare_image(read_image_file(path), side, quality, reduced)
    except ImageProblem as exc:
        return None, str(exc), False
    return jpeg, None, as_is


_images_done = None  # a counter shared with the workers, for the progress bar


def _start_worker(counter) -> None:
    global _images_done
    _images_done = counter
    # a worker must not outlive a killed parent: it would go on writing a shard the next run writes too
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def build_one_shard(job: ShardJob) -> dict:
    """Worker: the whole life of one shard (read, convert, write, rename, hash, index), then its record.
    A shard whose images are all skipped has a record and no tar."""
    writer = ShardWriter(Path(job.folder), job.split, job.number)
    skipped, counts = [], Counter()
    try:
        for k, (image_id, path, labels) in enumerate(job.items):
            jpeg, reason, as_is = prepare_one(path, job.shortest_side, job.quality, job.reduced_decode)
            if reason is not None:
                skipped.append([image_id, job.split, reason])
            else:
                writer.add(encode_sample(image_id, jpeg, **labels))
                counts["packed_as_is" if as_is else "reencoded"] += 1
            if _images_done is not None and k % 16 == 15:
                with _images_done.get_lock():
                    _images_done.value += 16
        shard = writer.close(positions=job.positions).to_dict() if writer.is_open else None
    finally:
        writer.abandon()
    record = {"fingerprint": job.fingerprint, "split": job.split, "number": job.number, "shard": shard,
              "skipped": skipped, "counts": dict(counts)}
    atomic_write_text(Path(job.folder) / RECORDS / f"{job.split}-{job.number:06d}.json", json.dumps(record))
    return record


def read_records(out: Path, fingerprint: str, restart: bool) -> dict[tuple[str, int], dict]:
    """The records of the shards an earlier run finished; refuses those of other settings unless restarting."""
    records = {}
    for path in sorted((out / RECORDS).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("fingerprint") != fingerprint:
            raise UserError(f"{out} holds an unfinished build with other settings or input; "
                            "run again with --restart to discard it")
        if not shard_files_intact(out, record.get("shard")):
            log.warning("%s: its shard is missing or not the size recorded; building it again", path.name)
            path.unlink()
            continue
        records[(record["split"], record["number"])] = record
    return records


def shard_files_intact(out: Path, shard: dict | None) -> bool:
    """A finished shard's tar (of the recorded size) and index are there (an empty shard has none)."""
    if not shard:
        return True
    tar, idx = out / shard["name"], out / shard["index"]
    return tar.is_file() and tar.stat().st_size == shard["bytes"] and idx.is_file()


def prepared_samples(cfg: Config, plan: Plan, split: SplitPlan, start: int, end: int, pool=None):
    """``(image_id, sample or None, skip reason or None, packed_as_is)`` for the images at positions
    ``start:end`` of the split's order, in that order (``verify --repair`` rebuilds a shard from these)."""
    positions = range(start, end)
    tasks = [(str(split.image_dir / f"{split.table.image_ids[split.order[p]]}.jpg"), cfg.data.shortest_side,
              cfg.data.jpeg_quality, cfg.data.reduced_decode) for p in positions]
    results = pool.starmap(prepare_one, tasks, chunksize=8) if pool else (prepare_one(*t) for t in tasks)
    for position, (jpeg, reason, as_is) in zip(positions, results):
        i = split.order[position]
        image_id = split.table.image_ids[i]
        if reason is not None:
            yield image_id, None, reason, False
        else:
            yield image_id, encode_sample(image_id, jpeg, **split.labels(plan.vocab, i)), None, as_is


def run_jobs(jobs, workers: int, bar) -> list[dict]:
    """Build the shards, ``workers`` at a time; a worker that dies fails the run (its shard is redone next time).
    Jobs are made as workers free up (at most two per worker wait), so memory does not grow with the set."""
    if workers == 1:
        records = []
        for job in jobs:
            records.append(build_one_shard(job))
            bar.update(len(job.items))
        return records
    counter = mp.get_context("fork").Value("q", 0)
    records, shown, jobs = [], 0, iter(jobs)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_start_worker,
                             initargs=(counter,)) as pool:
        pending = {}

        def top_up():
            while len(pending) < 2 * workers and (job := next(jobs, None)) is not None:
                pending[pool.submit(build_one_shard, job)] = job
        try:
            top_up()
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    records.append(future.result())
                    with counter.get_lock():
                        counter.value += len(job.items) % 16  # the worker counts in sixteens
                top_up()
                bar.update(counter.value - shown)
                shown = counter.value
        except BrokenProcessPool:
            raise UserError(f"a worker process died (killed, or out of memory) while building "
                            f"{', '.join(sorted(j.name for j in pending.values())[:3])}: run the same command "
                            "again; finished shards are kept and the rest are redone") from None
        finally:
            for future in pending:
                future.cancel()
    return records


def class_counts(split: SplitPlan, num_classes: int) -> list[int]:
    """Positive labels per class over a split's images (the fallback labels at inference come from these)."""
    in_split = np.zeros(len(split.table), dtype=bool)
    in_split[split.order] = True
    per_pair = np.repeat(in_split, np.diff(split.table.offsets))
    return np.bincount(split.table.classes[per_pair], minlength=num_classes).tolist()


def write_reports(cfg: Config, plan: Plan, records: list[dict], seconds: float) -> dict:
    """skipped.csv and, last, manifest.json, assembled from the shards' records."""
    out = cfg.paths.shards
    records = sorted(records, key=lambda r: (SPLITS.index(r["split"]), r["number"]))
    shards = [r["shard"] for r in records if r["shard"]]
    rows = sorted(plan.pre_skipped) + sorted(tuple(row) for r in records for row in r["skipped"])
    atomic_write_csv(out / SKIPPED, ["image_id", "split", "reason"], rows)
    counts = Counter()
    for r in records:
        counts.update(r["counts"])
    splits = {}
    for name in SPLITS:
        mine = [s for s in shards if s["split"] == name]
        splits[name] = {"shards": len(mine), "samples": sum(s["samples"] for s in mine),
                        "bytes": sum(s["bytes"] for s in mine)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "settings": {**shard_settings(cfg), "num_classes": len(plan.vocab),
                     **({"machine_label_splits": list(MACHINE_LABEL_SPLITS)} if cfg.data.machine_labels else {})},
        "classes": "classes.csv",
        "splits": splits,
        "shards": shards,
        "skipped": dict(sorted(Counter(r[2] for r in rows).items())),
        "images": {k: counts.get(k, 0) for k in ("packed_as_is", "reencoded")},
        "labels": {k: v.summary() for k, v in plan.label_reports.items()},
        "class_counts": {"train": class_counts(plan.splits[0], len(plan.vocab))},
        "build_seconds": round(seconds, 1),
    }
    write_manifest(out, manifest)
    return manifest


def cleanup_temporaries(folder: Path) -> None:
    for f in [*folder.glob(".*.tmp"), *(folder / RECORDS).glob(".*.tmp")]:
        f.unlink()


def log_summary(manifest: dict, out: Path) -> None:
    log.info("shards in %s:", out)
    for name, s in manifest["splits"].items():
        log.info(f"  {name:5s} {s['samples']:>9,d} images in {s['shards']:>4d} shards, {s['bytes'] / 1e9:.2f} GB")
    skipped = manifest["skipped"]
    total = sum(skipped.values())
    detail = ", ".join(f"{k}: {v}" for k, v in skipped.items())
    log.info(f"  skipped {total:,d} labeled images{f' ({detail})' if detail else ''}; see {out / SKIPPED}")
    machine = manifest["labels"].get("machine")
    if machine:
        splits = " and ".join(manifest["settings"].get("machine_label_splits", []))
        kept = (f"{machine['labels_kept']:,d} kept for {machine['images_with_labels']:,d} images, "
                if "labels_kept" in machine else "")  # a build made before the manifest counted them
        log.info(f"  machine labels in {splits}: {kept}{machine['rows_overruled_by_a_human_label']:,d} rows "
                 "overruled by a human label")
    bad_rows = sum(len(v["malformed_rows"]) for v in manifest["labels"].values())
    if bad_rows:
        log.info(f"  {bad_rows} malformed label rows were skipped; see 'labels' in {out / MANIFEST}")


def report_malformed(reports: dict[str, LabelProblems], files: dict[str, Path]) -> None:
    sources = {"train": files["train_human_labels.csv"], "tune": files["tuning_labels.csv"],
               "machine": files.get("train_machine_labels.csv")}
    for split, report in reports.items():
        for line, reason in report.malformed_rows[:20]:
            log.warning("%s line %d: %s; row skipped", sources[split], line, reason)
        if len(report.malformed_rows) > 20:
            log.warning("... and %d more malformed rows", len(report.malformed_rows) - 20)


def build_shards(cfg: Config, workers: int | None = None, restart: bool = False) -> dict:
    """The whole job; returns the manifest. Safe to call again after a crash."""
    files = data_files(cfg)
    started = time.time()
    out = writable_dir(cfg.paths.shards, "paths.shards")
    plan = make_plan(cfg, files)
    report_malformed(plan.label_reports, files)
    manifest_path = out / MANIFEST
    if manifest_path.exists() and not restart:
        manifest = read_manifest(out)
        if manifest.get("fingerprint") == plan.fingerprint:
            # a run killed between writing the manifest and removing its records leaves them behind
            shutil.rmtree(out / RECORDS, ignore_errors=True)
            log.info("%s is already complete and up to date", out)
            return manifest
        raise UserError(f"{out} holds shards built from other settings or input; "
                        "run again with --restart to rebuild them")
    if restart:
        for f in [*out.glob(SHARD_GLOB), *out.glob(INDEX_GLOB), manifest_path, out / SKIPPED]:
            f.unlink(missing_ok=True)
        shutil.rmtree(out / RECORDS, ignore_errors=True)
    (out / RECORDS).mkdir(exist_ok=True)
    cleanup_temporaries(out)
    done = read_records(out, plan.fingerprint, restart)
    plan.vocab.save(out)
    todo = [(s, number, end - start) for s in plan.splits for number, (start, end) in enumerate(shard_bounds(cfg, s))
            if (s.name, number) not in done]
    jobs = (job for split in plan.splits for job in shard_jobs(cfg, plan, split, set(done)))
    asked = worker_count(workers)
    if not done and len(todo) < asked:
        # shard boundaries never depend on the worker count (the same bytes with any --workers): say it here
        log.warning("%d shard(s) to build for %d workers: %d worker(s) will idle; for a small dataset, a smaller "
                    "data.shard_max_samples (now %d) cuts more shards", len(todo), asked, asked - len(todo),
                    cfg.data.shard_max_samples)
    workers = min(asked, max(1, len(todo)))
    with progress(log, total=sum(n for *_, n in todo), unit="img", desc="building shards", smoothing=0.05) as bar:
        records = list(done.values()) + run_jobs(jobs, workers, bar)
    manifest = write_reports(cfg, plan, records, time.time() - started)
    shutil.rmtree(out / RECORDS)  # the manifest holds it all now
    log_summary(manifest, out)
    return manifest


@command
def main(argv=None):
    parser = config_parser("python -m preprocessing.build_shards", __doc__)
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes, each building whole shards (default: every CPU this process may use, a "
                             "container's CPU quota included); "
                             "the output does not depend on it")
    parser.add_argument("--restart", action="store_true",
                        help="discard an unfinished or outdated build in paths.shards and start over")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    cfg = config_from_args(args)
    build_shards(cfg, args.workers, args.restart)


if __name__ == "__main__":
    main()
