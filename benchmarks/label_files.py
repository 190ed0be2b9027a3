"""The label files at full size: ``train_human_labels.csv`` alone, and with ``train_machine_labels.csv``.

    python -m benchmarks.label_files [--repeats 3] [--work DIR] [--scale 1] [--json PATH]

Writes synthetic files of the real ones' shape once into --work (16-hex-digit ids; 8.04 M human rows over
1.74 M images, Confidence 0/1; 15.3 M machine rows over the same images and 2 % others, confidences 0.5 to
1.0 in steps of 0.1; 7,178 trainable codes among 19,178), then runs the shard builder's label reading in a
fresh process per run: ``human`` (``read_human_labels``) and ``human_and_machine`` (that, then
``read_machine_labels`` against its table). Reports the median wall time (min, max) and the peak resident
memory of the whole process (Python, pandas and the data; the process imports nothing else), and the second's ratio to the first beside the
ratio of their rows: the machine labels should cost no more per row than the human ones.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import command

N_CLASSES, N_OTHER_CODES = 7178, 12000
HUMAN_ROWS, MACHINE_ROWS, IMAGES = 8_040_000, 15_300_000, 1_743_042
COLUMNS = "ImageID,Source,LabelName,Confidence\n"


def codes(n: int, prefix: str) -> np.ndarray:
    return np.array([f"/m/0{prefix}{i:05d}" for i in range(n)], dtype=object)


def write_rows(path: Path, ids: np.ndarray, rows: int, source: str, confidences: np.ndarray, every: np.ndarray,
               rng: np.random.Generator) -> None:
    """``rows`` rows over ``ids``, one image's rows adjacent as in the real files, codes Zipf-distributed."""
    per_image = np.sort(rng.integers(0, len(ids), rows))
    with open(path, "w") as f:
        f.write(COLUMNS)
        for start in range(0, rows, 1_000_000):
            idx = per_image[start:start + 1_000_000]
            pd.DataFrame({"ImageID": ids[idx], "Source": source,
                          "LabelName": every[np.minimum(rng.zipf(1.3, len(idx)) - 1, len(every) - 1)],
                          "Confidence": confidences[rng.integers(0, len(confidences), len(idx))]}
                         ).to_csv(f, header=False, index=False)


def write_synthetic(folder: Path, scale: float = 1.0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    trainable = codes(N_CLASSES, "t")
    pd.DataFrame({"label_code": trainable}).to_csv(folder / "classes-trainable.csv", index=False)
    every = np.concatenate([trainable, codes(N_OTHER_CODES, "u")])
    pd.DataFrame({"label_code": every, "description": every}).to_csv(folder / "class-descriptions.csv", index=False)
    ids = np.array([f"{x:016x}" for x in rng.integers(0, 2**63, max(1, round(IMAGES * scale)))], dtype=object)
    human = np.array(["1"] * 72 + ["0"] * 28, dtype=object)
    write_rows(folder / "train_human_labels.csv", ids, round(HUMAN_ROWS * scale), "verification", human, every, rng)
    others = np.array([f"{x:016x}" for x in rng.integers(0, 2**63, max(1, len(ids) // 50))], dtype=object)
    machine = np.array([f"{c / 10:.1f}" for c in range(5, 11)], dtype=object)
    write_rows(folder / "train_machine_labels.csv", np.concatenate([ids, others]), round(MACHINE_ROWS * scale),
               "machine", machine, every, rng)


def measure(folder: Path, with_machine: bool) -> dict:
    """One run, in this (fresh) process, so that the peak memory is this job's alone."""
    from common.vocab import Vocabulary
    from preprocessing.labels import read_human_labels, read_machine_labels

    started = time.perf_counter()
    vocab = Vocabulary.from_kaggle(folder / "classes-trainable.csv", folder / "class-descriptions.csv")
    table, problems = read_human_labels(folder / "train_human_labels.csv", vocab)
    rows = problems.rows
    result = {"images_with_labels": len(table), "positive_pairs": int(len(table.classes))}
    if with_machine:
        soft, machine_problems = read_machine_labels(folder / "train_machine_labels.csv", vocab, table)
        rows += machine_problems.rows
        result["machine_pairs"] = int(len(soft.classes))
    return {"seconds": round(time.perf_counter() - started, 2), "rows": rows,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), **result}


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


@command
def main(argv=None):
    # here, not at the top: the harness imports torch, which the measured processes must not hold in memory
    from benchmarks.harness import at_least_one, parser, write_json
    p = parser("benchmarks.label_files", __doc__)
    p.add_argument("--repeats", type=at_least_one, default=3, help="runs of each, each in a fresh process (default 3)")
    p.add_argument("--work", type=Path, default=Path("/tmp/iic_label_files"),
                   help="where the synthetic files are written once (about 1.3 GB)")
    p.add_argument("--scale", type=share, default=1.0,
                   help="rows and images as a share of the real files' (default 1: full size)")
    p.add_argument("--measure", nargs=2, metavar=("FOLDER", "MACHINE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1] == "1")))
        return
    folder = args.work / ("full" if args.scale == 1 else f"scale{args.scale:g}")
    if not (folder / "train_machine_labels.csv").exists():
        print(f"writing synthetic label files to {folder} (a few minutes at full size, once) ...", flush=True)
        write_synthetic(folder, args.scale)
    runs: dict[str, list[dict]] = {"human": [], "human_and_machine": []}
    for _ in range(args.repeats):  # interleaved, so that a busy spell of the machine falls on both
        for name, machine in (("human", "0"), ("human_and_machine", "1")):
            out = subprocess.run([sys.executable, "-m", "benchmarks.label_files", "--measure", str(folder), machine],
                                 check=True, capture_output=True, text=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    results = {}
    for name, mine in runs.items():
        secs = [r["seconds"] for r in mine]
        results[name] = {"seconds": statistics.median(secs), "min": min(secs), "max": max(secs),
                         "peak_rss_gb": max(r["peak_rss_gb"] for r in mine),
                         **{k: v for k, v in mine[0].items() if k not in ("seconds", "peak_rss_gb")}, "runs": mine}
    h, hm = results["human"], results["human_and_machine"]
    results["time_ratio"] = round(hm["seconds"] / h["seconds"], 2)
    results["rows_ratio"] = round(hm["rows"] / h["rows"], 2)
    for name in runs:
        r = results[name]
        print(f"{name:18s} {r['seconds']:6.1f} s (min {r['min']}, max {r['max']}), peak {r['peak_rss_gb']} GB, "
              f"{r['rows']:,d} rows")
    print(f"with the machine labels: {results['time_ratio']}x the time for {results['rows_ratio']}x the rows")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
