"""Time to accuracy on the demo data: the original schedule, the resolution schedule alone and the fast preset.

    python -m benchmarks.time_to_accuracy --json PATH [--plot PATH] [--recipes original,progressive,fast]

Generates the demo data and builds its shards once, then for each recipe runs the README's commands with
``demo/config.yaml`` (the fast preset: ``demo/fast.yaml``, the demo's sizes of ``configs/fast.yaml``): the train
stage (timed), the tune stage from its ``best.pt``, a stage-2 submission and its score. Every choice (the epoch of
``best.pt``, the rule, the test resolution) is made on the tune stage's hold-out; stage 2 only scores.

Recipes (``RECIPES``): ``original``, the demo's schedule (every epoch at its 56-px crop); ``progressive``, the same
schedule with crops of 40 px rising to 56 over epochs 9 to 13 (``train.resolution``); ``fast``, the preset.

JSON: ``{"recipes": {NAME: {"train_seconds", "stage2_f2", "images_per_s_by_side", "gap_by_epoch": [[seconds, GAP],
...], ...}}, "ratios": {...}}``; the plot: validation GAP against the train stage's elapsed seconds, a line a recipe.
``--quick``: a small demo set and short schedules, to check the wiring (the test suite's form), not to measure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.harness import (DEMO_CONFIG, demo_settings, fresh_scratch, metrics_epochs, output_file, parser, run,
                                scratch_folder, tune_figures, write_json)
from common.cli import command

MARKER = ".made_by_benchmarks.time_to_accuracy"
FAST_CONFIG = DEMO_CONFIG.parent / "fast.yaml"
PROGRESSIVE = "train.resolution={start: 40, end: 56, start_epoch: 8, end_epoch: 12, step: 8}"
RECIPES = {"original": (DEMO_CONFIG, ()), "progressive": (DEMO_CONFIG, (PROGRESSIVE,)), "fast": (FAST_CONFIG, ())}
QUICK = ("train.epochs=3", "tune.epochs=2", "train.resolution.start_epoch=0", "train.resolution.end_epoch=2")


def recipe_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: the recipes are {', '.join(RECIPES)}")
    return names


def quick_sets(recipe: str) -> tuple[str, ...]:
    """--quick: three epochs, the resolution ramp (where the recipe has one) within them."""
    ramp = recipe != "original"
    return tuple(s for s in QUICK if ramp or "resolution" not in s)


def measure(work: Path, name: str, quick: bool) -> dict:
    config, sets = RECIPES[name]
    sets = (*sets, *(quick_sets(name) if quick else ()))
    out = work / name
    settings = demo_settings(work, out, *sets, config=config)
    started = time.time()
    run("training.train", *settings, "--stage", "train")
    seconds = time.time() - started
    run("training.train", *settings, "--stage", "tune")
    epochs = metrics_epochs(out / "train")
    by_side: dict[int, list[float]] = {}
    for r in epochs:
        by_side.setdefault(r["resolution"], []).append(r["images_per_s"])
    report = json.loads((out / "tune" / "report.json").read_text())
    return {"config": config.name, "overrides": list(sets), "train_seconds": round(seconds, 1),
            "gap_by_epoch": [[round(r["wall_time"] - started, 1), round(r["val_gap"], 4)] for r in epochs],
            "final_val_gap": round(epochs[-1]["val_gap"], 4),
            "images_per_s_by_side": {side: round(statistics.median(v), 1) for side, v in by_side.items()},
            "test_resolution": report.get("chosen_resolution"), **tune_figures(work, out)}


def plot(path: Path, recipes: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, r in recipes.items():
        seconds, gap = zip(*r["gap_by_epoch"])
        ax.plot(seconds, gap, marker=".", label=f"{name} (stage-2 F2 {r['stage2_f2']:.3f})")
    ax.set_xlabel("train stage, seconds")
    ax.set_ylabel("validation GAP")
    ax.set_title("time to accuracy on the demo data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@command
def main(argv=None):
    p = parser("benchmarks.time_to_accuracy", __doc__)
    p.add_argument("--plot", type=output_file, metavar="PATH", help="GAP against training time (PNG)")
    p.add_argument("--recipes", type=recipe_names, default=list(RECIPES), help=f"some of {','.join(RECIPES)}")
    p.add_argument("--quick", action="store_true", help="a small demo set and 3 epochs: the wiring, not figures")
    p.add_argument("--work", type=scratch_folder(MARKER), default=Path("/tmp/iic_time_to_accuracy"),
                   help="scratch folder: new, empty, or one this benchmark made (it is emptied first)")
    args = p.parse_args(argv)
    if args.json is None:
        p.error("--json PATH is required")
    started = time.time()
    work = fresh_scratch(args.work, MARKER)
    print("demo data and shards ...", flush=True)
    run("demo.data", str(work / "data"), *(["--train", "300", "--stage1", "120", "--stage2", "60", "--tune", "100"]
                                           if args.quick else []))
    run("preprocessing.build_shards", *demo_settings(work, work))
    result = {"recipes": {}, "quick": args.quick}
    for name in args.recipes:
        print(f"{name}: train, tune, submit ...", flush=True)
        result["recipes"][name] = measure(work, name, args.quick)
        print(json.dumps(result["recipes"][name]), flush=True)
        write_json(args.json, result)
    if "original" in result["recipes"]:
        base = result["recipes"]["original"]
        result["ratios"] = {name: {"train_seconds_vs_original": round(r["train_seconds"] / base["train_seconds"], 3),
                                   "stage2_f2_minus_original": round(r["stage2_f2"] - base["stage2_f2"], 4)}
                            for name, r in result["recipes"].items() if name != "original"}
    result["seconds"] = round(time.time() - started)
    write_json(args.json, result)
    if args.plot:
        plot(args.plot, result["recipes"])
    print("\n| recipe | train stage s | images/s by crop side | final val GAP | stage-2 F2 (tuned) |\n"
          "|---|---|---|---|---|")
    for name, r in result["recipes"].items():
        sides = ", ".join(f"{s} px {v:.0f}" for s, v in r["images_per_s_by_side"].items())
        print(f"| {name} | {r['train_seconds']:.0f} | {sides} | {r['final_val_gap']:.3f} | {r['stage2_f2']:.3f} |")


if __name__ == "__main__":
    main()
