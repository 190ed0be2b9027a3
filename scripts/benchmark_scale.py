#!/usr/bin/env python3
"""The shard builder at scale: build, verify and read once through the train loader a large synthetic set.

    python scripts/benchmark_scale.py [--images 50000] [--small 10000] [--workers 2] [--json PATH]

Writes ``--images`` already-resized 256-px JPEGs in the Kaggle layout (photographs, as the
throughput benchmark), then, each in its own process as a user runs it:
- builds the shards of the first ``--small`` images and of all of them (shards of 2,000), and
  reports each build's peak resident memory (the largest of the builder and its workers), to show
  it does not grow with the number of images;
- reports images/s per fifth of the shards of the large build (from the times the shards were
  finished), to show the rate does not fall as shards accumulate;
- verifies the large build (``preprocessing.verify --workers``) and reads it once through the
  DALI train loader on the CPU;
and projects the build to the 1.74 M images of the real set at the measured rate per worker.
Unlike the other benchmarks, each figure is one run, not the median of windows: a build of 50,000 images is
one window of minutes, and what it shows (memory and rate that do not change as a build grows) is read within
that run, per fifth of its shards.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common.cli import command  # noqa: E402
from benchmark_args import at_least_one, output_file  # noqa: E402 (scripts/)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB of the largest process it started) of one command in its own process."""
    code = ("import resource, subprocess, sys, time; s = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], cwd=REPO, check=True, capture_output=True, text=True)
    seconds, kb = out.stdout.split()
    return float(seconds), int(kb) / 1e6


def rate_by_fifth(folder: Path, manifest: dict, started: float) -> list[float]:
    """Images/s in each fifth of the build, from the finishing times of its shards (their files' mtimes)."""
    shards = sorted(manifest["shards"], key=lambda s: (folder / s["name"]).stat().st_mtime)
    times = [(folder / s["name"]).stat().st_mtime - started for s in shards]
    rates, fifth = [], max(1, len(shards) // 5)
    for k in range(0, len(shards) - fifth + 1, fifth):
        begin = times[k - 1] if k else 0.0
        rates.append(round(sum(s["samples"] for s in shards[k:k + fifth]) / (times[k + fifth - 1] - begin), 1))
    return rates


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=at_least_one, default=50000)
    parser.add_argument("--small", type=at_least_one, default=10000)
    parser.add_argument("--workers", type=at_least_one, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args(argv)
    from demo.photos import write_photo_dataset

    result = {"images": args.images, "small": args.small, "workers": args.workers, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="iic_scale_", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        layout = write_photo_dataset(work / "data", args.images)
        result["generate_seconds"] = round(time.perf_counter() - started, 1)
        small = work / "small"
        small.mkdir()
        rows = (layout.competition_data / "train_human_labels.csv").read_text().splitlines()
        keep = {f"{k:016x}" for k in range(args.small)}
        (small / "train_human_labels.csv").write_text(
            "\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[0] in keep]) + "\n")
        for name in ("classes-trainable.csv", "class-descriptions.csv", "tuning_labels.csv"):
            (small / name).write_bytes((layout.competition_data / name).read_bytes())
        (small / "stage_1_test_images").mkdir()

        def config(comp: Path, shards: Path) -> list[str]:
            return ["--config", str(REPO / "config.yaml"), "--set", f"paths.original_images={layout.original_images}",
                    "--set", f"paths.competition_data={comp}", "--set", f"paths.shards={shards}",
                    "--set", "data.shard_max_samples=2000"]

        build = [sys.executable, "-m", "preprocessing.build_shards", "--workers", str(args.workers)]
        for name, comp, count in (("small", small, args.small), ("large", layout.competition_data, args.images)):
            shards = work / f"shards-{name}"
            wall = time.time()
            seconds, peak = run(build + config(comp, shards))
            result[f"build_{name}"] = {"images": count, "seconds": round(seconds, 1),
                                       "images_per_s": round(count / seconds, 1), "peak_rss_gb": round(peak, 3)}
        manifest = json.loads((shards / "manifest.json").read_text())
        result["build_large"]["images_per_s_by_fifth"] = rate_by_fifth(shards, manifest, wall)
        seconds, peak = run([sys.executable, "-m", "preprocessing.verify", "--workers", str(args.workers),
                             *config(layout.competition_data, shards)])
        result["verify"] = {"seconds": round(seconds, 1), "images_per_s": round(args.images / seconds, 1)}

        from common.config import load_config
        from dali_pipes.loader import train_loader
        cfg = load_config(REPO / "config.yaml", [f"paths.shards={shards}", "pipeline.device=cpu",
                                                 f"pipeline.num_threads={args.workers}"])
        loader = train_loader(cfg, batch_size=256)
        started, seen = time.perf_counter(), 0
        for images, _ in loader:
            seen += len(images)
        result["train_loader_pass"] = {"images": seen, "seconds": round(time.perf_counter() - started, 1),
                                       "images_per_s": round(seen / (time.perf_counter() - started), 1)}
    per_worker = result["build_large"]["images_per_s"] / args.workers
    result["projection_1_74M"] = {f"{w}_workers_minutes": round(1.74e6 / (per_worker * w) / 60, 1) for w in (16, 64)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
