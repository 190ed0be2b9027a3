#!/usr/bin/env python3
"""Training images/s on a quiet CPU and on one where another process keeps a core busy, with the thread
budget (common.threads) and without it (every library at its defaults), measured interleaved.

    python scripts/benchmark_threads.py [--repeats 5] [--steps 40] [--json out.json]

Each measurement is one training process on the demo data (``demo/config.yaml``: timm's test_resnet on 56-px
crops, batch 32), ``--steps`` steps of one epoch, images/s as training reports it (the epoch's images over its
time, start-up and validation excluded: a window of about 3 s at 40 steps). Each figure is the median, with
min and max, of --repeats such windows. The order is off-quiet, off-busy, on-quiet, on-busy, repeated, so that
drift on a shared machine hits every case alike; each ratio (busy / quiet) is the median of the ratios of one
repeat's pair. The busy process is a Python loop that never sleeps, started before the training process and
stopped after it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from common.cli import command  # noqa: E402
from benchmark_args import at_least_one, output_file  # noqa: E402 (scripts/)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_data(work: Path, images: int) -> Path:
    from common.config import load_config
    from demo.data import generate_demo_data
    from preprocessing.build_shards import build_shards
    generate_demo_data(work / "data", n_train=images, n_stage1=20, n_stage2=20, n_tune=10)
    config = work / "config.yaml"
    config.write_text(f"extends: {REPO / 'demo' / 'config.yaml'}\npaths:\n"
                      f"  original_images: {work / 'data' / 'original_images'}\n"
                      f"  competition_data: {work / 'data' / 'inclusive'}\n  shards: {work / 'shards'}\n"
                      f"  artifacts: {work / 'artifacts'}\n  output: {work / 'output'}\n")
    build_shards(load_config(config))
    return config


def train_rate(config: Path, work: Path, steps: int, budget: bool, busy: bool) -> float:
    artifacts = work / "run"
    shutil.rmtree(artifacts, ignore_errors=True)
    env = {**os.environ, "IIC_THREAD_BUDGET": "on" if budget else "off"}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        r = subprocess.run([sys.executable, "-m", "training.train", "--config", str(config), "--stage", "train",
                            "--set", "train.epochs=1", "--set", f"train.max_steps_per_epoch={steps}",
                            "--set", f"paths.artifacts={artifacts}"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1800)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    if r.returncode:
        raise SystemExit(f"error: the training run failed: {r.stderr.strip().splitlines()[-1:]}")
    epochs = [json.loads(line) for line in (artifacts / "train" / "metrics.jsonl").read_text().splitlines()
              if "images_per_s" in line]
    return epochs[-1]["images_per_s"]


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=at_least_one, default=5, help="windows (training runs) per case")
    parser.add_argument("--steps", type=at_least_one, default=40, help="training steps per measurement (batch 32)")
    parser.add_argument("--images", type=at_least_one, default=2000, help="demo training images to generate")
    parser.add_argument("--json", type=output_file, help="write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="iic_bench_threads_"))
    try:
        config = make_data(work, args.images)
        runs = {(b, q): [] for b in (False, True) for q in (False, True)}
        for repeat in range(args.repeats):
            for budget in (False, True):
                for busy in (False, True):
                    rate = train_rate(config, work, args.steps, budget, busy)
                    runs[(budget, busy)].append(rate)
                    print(f"repeat {repeat + 1}: budget {'on ' if budget else 'off'} "
                          f"{'busy ' if busy else 'quiet'} {rate:8.1f} images/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"setup": {"cores": len(os.sched_getaffinity(0)), "steps": args.steps, "repeats": args.repeats,
                        "busy_processes": 1}}
    for budget in (False, True):
        name = "budget_on" if budget else "budget_off"
        quiet, busy = runs[(budget, False)], runs[(budget, True)]
        result[name] = {"quiet_images_per_s": round(statistics.median(quiet), 1),
                        "busy_images_per_s": round(statistics.median(busy), 1),
                        "quiet_min_max": [round(min(quiet), 1), round(max(quiet), 1)],
                        "busy_min_max": [round(min(busy), 1), round(max(busy), 1)],
                        "quiet_runs": [round(r, 1) for r in quiet], "busy_runs": [round(r, 1) for r in busy],
                        "busy_vs_quiet": round(statistics.median(b / q for b, q in zip(busy, quiet)), 3)}
        print(f"{name}: quiet {result[name]['quiet_images_per_s']}, busy {result[name]['busy_images_per_s']} "
              f"images/s, busy/quiet {result[name]['busy_vs_quiet']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
