#!/usr/bin/env python3
"""Benchmark: read and group a full-size train_human_labels.csv (8.04 M rows, 1.74 M images).

    python scripts/benchmark_labels.py [--rows 8040000] [--images 1743042] [--work DIR]

Writes a synthetic file with the real file's shape (16-hex-digit ids, 7,178 trainable
codes plus untrainable ones, Confidence 0/1, four Source values) once, then runs
``preprocessing.labels.read_human_labels`` in a fresh process and reports wall time
and peak resident memory (the whole process: Python, pandas and the data).
Target: under 60 s and under 4 GB on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common.cli import command  # noqa: E402
from benchmark_args import at_least_one, output_file  # noqa: E402 (scripts/)

N_CLASSES = 7178


def codes(n: int, prefix: str) -> np.ndarray:
    return np.array([f"/m/0{prefix}{i:05d}" for i in range(n)], dtype=object)


def write_synthetic(folder: Path, rows: int, images: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    trainable = codes(N_CLASSES, "t")
    pd.DataFrame({"label_code": trainable}).to_csv(folder / "classes-trainable.csv", index=False)
    every = np.concatenate([trainable, codes(12000, "u")])
    pd.DataFrame({"label_code": every, "description": every}).to_csv(folder / "class-descriptions.csv", index=False)
    ids = np.array([f"{x:016x}" for x in rng.integers(0, 2**63, images)], dtype=object)
    per_image = np.sort(rng.integers(0, images, rows))  # rows of one image are adjacent, as in the real file
    sources = np.array(["verification", "crowdsource-verification", "machine", "human"], dtype=object)
    with open(folder / "train_human_labels.csv", "w") as f:
        f.write("ImageID,Source,LabelName,Confidence\n")
        for start in range(0, rows, 1_000_000):
            idx = per_image[start:start + 1_000_000]
            chunk = pd.DataFrame({
                "ImageID": ids[idx],
                "Source": sources[rng.integers(0, 4, len(idx))],
                "LabelName": every[np.minimum(rng.zipf(1.3, len(idx)) - 1, len(every) - 1)],
                "Confidence": np.where(rng.random(len(idx)) < 0.72, "1", "0"),
            })
            chunk.to_csv(f, header=False, index=False)


def measure(folder: Path) -> dict:
    """Runs in a fresh process so that peak memory is this job's alone."""
    from common.vocab import Vocabulary
    from preprocessing.labels import read_human_labels

    start = time.perf_counter()
    vocab = Vocabulary.from_kaggle(folder / "classes-trainable.csv", folder / "class-descriptions.csv")
    table, problems = read_human_labels(folder / "train_human_labels.csv", vocab)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "rows": problems.rows, "images_with_labels": len(table), "positive_pairs": int(len(table.classes))}


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=at_least_one, default=8_040_000)
    parser.add_argument("--images", type=at_least_one, default=1_743_042)
    parser.add_argument("--work", type=Path, default=Path("/tmp/iic_label_benchmark"))
    parser.add_argument("--repeats", type=at_least_one, default=5,
                        help="runs, each in a fresh process (a run of the full-size file is a window of many seconds)")
    parser.add_argument("--json", type=output_file, help="write the runs and their median, min and max here")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    folder = args.work / f"{args.rows}x{args.images}"
    if not (folder / "train_human_labels.csv").exists():
        print(f"writing a synthetic label file to {folder} ...", flush=True)
        write_synthetic(folder, args.rows, args.images)
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, __file__, "--measure", str(folder)], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    secs = [r["seconds"] for r in runs]
    summary = {"seconds": statistics.median(secs), "min": min(secs), "max": max(secs),
               "peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "rows": runs[0]["rows"],
               "images_with_labels": runs[0]["images_with_labels"], "runs": runs}
    print(f"median {summary['seconds']} s (min {summary['min']}, max {summary['max']}), peak "
          f"{summary['peak_rss_gb']} GB for {runs[0]['rows']:,d} rows / {runs[0]['images_with_labels']:,d} images")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
