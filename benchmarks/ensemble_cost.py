#!/usr/bin/env python3
"""What an ensemble buys and costs, on the demo data: members that differ only in ``train.seed``.

    python -m benchmarks.ensemble_cost [--work DIR] [--members 3] [--rounds 3] [--json out.json]

Generates the demo data (``python -m demo.data``) and builds its shards in --work (kept, so a second run skips
what is done), trains and tunes --members members with ``demo/config.yaml`` and ``train.seed`` 1, 2, ...
(each in its own artifacts folder), makes the ensemble of the first two with ``python -m inference.ensemble``,
and measures:

1. the stage-2 F2 of each of the two members' submissions and of the ensemble's (``inference.submit``, scored
   against the demo's stage-2 solution);
2. the wall time of the ensemble's one-pass submission against the two members' submissions together: the
   three commands run in turn, --rounds times, and the ratio is the median of the rounds' ratios;
3. inference images/s with 1, 2, ... --members members predicting the stage-2 images from one pass
   (``inference.file_predictions.predict_files``; interleaved windows of at least 2 s, ``benchmarks.harness``).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO, at_least_one, interleaved, parser, write_json
from common.cli import command


def run(args: list[str], env=None) -> float:
    """Run ``python -m ...`` from the repository root; its wall time in seconds. Output goes to ours."""
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, env=env)
    return time.perf_counter() - started


@command
def main(argv=None):
    p = parser("benchmarks.ensemble_cost", __doc__, windows=5)
    p.add_argument("--work", type=Path, default=REPO / "demo_ensemble",
                   help="data, shards, members and submissions (default: demo_ensemble/, kept for reruns)")
    p.add_argument("--members", type=at_least_one, default=3, help="members trained (the F2 uses the first two)")
    p.add_argument("--rounds", type=at_least_one, default=3, help="timed rounds of the three submissions")
    args = p.parse_args(argv)
    work = args.work.resolve()
    cfg_args = ["--config", str(REPO / "demo" / "config.yaml"), "--set", f"paths.original_images={work}/data/original_images",
                "--set", f"paths.competition_data={work}/data/inclusive", "--set", f"paths.shards={work}/shards"]
    if not (work / "data" / "inclusive" / "stage_2_solution.csv").is_file():
        run(["-m", "demo.data", str(work / "data")])
    if not (work / "shards" / "manifest.json").is_file():
        run(["-m", "preprocessing.build_shards", *cfg_args])

    members = []
    for seed in range(1, args.members + 1):
        member = [*cfg_args, "--set", f"train.seed={seed}", "--set", f"paths.artifacts={work}/seed{seed}",
                  "--set", f"paths.output={work}/out_seed{seed}"]
        for stage in ("train", "tune"):  # a finished stage returns at once (it resumes from its last.pt)
            run(["-m", "training.train", *member, "--stage", stage])
        members.append((f"seed{seed}", member, work / f"seed{seed}" / "tune" / "checkpoints" / "best.pt"))
    ensemble = work / "ENSEMBLE"
    run(["-m", "inference.ensemble", *cfg_args, "--out", str(ensemble),
         "--checkpoint", str(members[0][2]), "--checkpoint", str(members[1][2])])
    holdout = json.loads(ensemble.read_text())

    from inference.score import read_labels, score
    solution = read_labels(work / "data" / "inclusive" / "stage_2_solution.csv", "SOLUTION")
    submits = {name: ([*member, "--checkpoint", str(ckpt)], work / f"out_{name}") for name, member, ckpt in members[:2]}
    submits["ensemble"] = ([*cfg_args, "--set", f"paths.output={work}/out_ensemble", "--checkpoint", str(ensemble)],
                           work / "out_ensemble")
    seconds = {name: [] for name in submits}
    for _ in range(args.rounds):
        for name, (submit_args, _) in submits.items():
            seconds[name].append(run(["-m", "inference.submit", *submit_args, "--stage", "2"]))
    f2 = {name: score(read_labels(out / "submission_stage2.csv", "SUBMISSION"), solution)[0]
          for name, (_, out) in submits.items()}
    time_ratio = statistics.median(e / (a + b) for e, a, b in zip(seconds["ensemble"], seconds["seed1"],
                                                                  seconds["seed2"]))
    speed = images_per_s([m[2] for m in members], cfg_args, work, args.window_s, args.windows)

    result = {"stage2_f2": {k: round(v, 4) for k, v in f2.items()},
              "holdout_f2": {"ensemble": holdout["holdout_f2"], "members": [m["holdout_f2"] for m in holdout["members"]]},
              "ensemble_gain_over_best_member": round(f2["ensemble"] - max(f2["seed1"], f2["seed2"]), 4),
              "submit_seconds": {k: [round(s, 1) for s in v] for k, v in seconds.items()},
              "ensemble_time_vs_two_submits": round(time_ratio, 3), "inference": speed,
              "setup": {"cpu_count": os.cpu_count(), "members": args.members, "rounds": args.rounds,
                        "config": "demo/config.yaml", "images": len(solution)}}
    print(json.dumps(result, indent=1))
    write_json(args.json, result)


def images_per_s(checkpoints: list[Path], cfg_args: list[str], work: Path, window_s: float, windows: int) -> dict:
    """Stage-2 images/s with the first 1, 2, ... members from one pass each, measured interleaved."""
    import torch
    from common.config import load_config
    from common.runtime import start_runtime
    from dali_pipes.settings import PipeSettings
    from inference.file_predictions import predict_files, screen
    from model.members import Combination, load_members, member_models

    overrides = [a for a in cfg_args[3:] if a != "--set"]
    cfg = load_config(cfg_args[1], overrides)
    files = sorted((cfg.paths.competition_data / "stage_2_test_images").glob("*.jpg"))
    files = [f for f, bad in zip(files, screen(files)) if not bad]
    with start_runtime(cfg, announce=False) as runtime, torch.no_grad():
        pipes = PipeSettings.from_config(cfg, runtime)
        models = member_models(load_members(checkpoints), cfg.model.channels_last, runtime.device.torch_device)

        def passes(n):
            while True:  # one pass over every image per batch: a fresh pipeline each time, as a submission builds
                yield predict_files(models[:n], files, runtime, pipes, cfg.predict, combination=Combination())

        r = interleaved({f"{n}_members": (passes(n), None) for n in range(1, len(models) + 1)}, len(files),
                        window_s, windows)
    out = {name: {k: v[k] for k in ("images_per_s", "min", "max")} for name, v in r.items() if name != "ratios"}
    for n in range(2, len(models) + 1):
        out[f"{n}_members"]["vs_1_member"] = round(r["ratios"][f"{n}_members"]["1_members"], 3)
    return out


if __name__ == "__main__":
    main()
