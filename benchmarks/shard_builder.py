"""The shard builder: its image step against the original solution's, the repack by worker count, and a build
at scale.

    python -m benchmarks.shard_builder [--parts image_step,repack,scale] [--json PATH]

``image_step`` (one core, side by side on the same inputs):
- ``seed_cv2``: the original's loop (OpenCV full decode, ``cv2.resize`` with its default bilinear
  filter, ``cv2.imencode`` at its default quality 95);
- ``prepare_image``: this project's image step.
Each gets ``images_per_s`` over 1024-px photographs (scikit-image's samples, the size of the Open
Images originals) and fine-detail images (zone plates over pixel noise) together: the median (with min and
max) of --windows windows of at least --window-s seconds, the two steps taking theirs in turn, so that
``prepare_image_vs_seed_cv2`` is the median of the rounds' paired ratios; and PSNR against a full decode resized
with Lanczos to the exact target size: ``psnr_db`` (photos) and ``psnr_detail_db`` (fine detail, where a plain
bilinear filter aliases); ``size_errors`` counts outputs whose size differs from the size computed from the
original dimensions.

``repack``: --repack already-resized 256-px JPEGs packed as is with 1 and 2 workers, in shards of 500, each
build in its own process as a user runs it, --repeats times; the steady rate is the difference between the
medians of a 2,000-image and a full build (start-up cancels out); 1.74 M images on 16 cores projected.

``scale``: --scale-images already-resized photographs, built (the first --scale-small and all of them, shards of
2,000, --workers), verified and read once through the DALI train loader, each command in its own process; peak
resident memory per build (the largest of the builder and its workers) and images/s per fifth of the large
build's shards show whether memory or rate change as a build grows. Each is one long run, not the median of
windows: a build of 50,000 images is one window of minutes, read within the run per fifth of its shards.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import REPO, at_least_one, interleaved, parser, write_json
from common.cli import command
from common.threads import usable_cores
from benchmarks.photos import photo_jpegs, write_photo_dataset
from preprocessing.resize import prepare_image, resized_size

SIDE, QUALITY = 256, 95
PARTS = ("image_step", "repack", "scale")


def seed_cv2(data: bytes) -> bytes:
    """The original solution's image step (its prepare script, with OpenCV's defaults)."""
    import cv2
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    image = cv2.resize(image, resized_size(w, h, SIDE))
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes()


def ours(data: bytes) -> bytes:
    return prepare_image(data, SIDE, QUALITY)[0]


def detail_images(count: int, size=(1024, 768), seed: int = 0) -> list[bytes]:
    """Zone plates over pixel-scale noise: content at every frequency, where resizers alias."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    out = []
    for _ in range(count):
        zone = 127.5 + 127.5 * np.cos(rng.uniform(0.3, 1.2) * ((x - size[0] / 2) ** 2 + (y - size[1] / 2) ** 2) / 600)
        noise = np.repeat(np.repeat(rng.integers(0, 256, (size[1] // 2, size[0] // 2, 3)), 2, 0), 2, 1)
        pixels = np.clip(0.6 * zone[..., None] + 0.4 * noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)


def reference(data: bytes) -> np.ndarray:
    """Full decode, Lanczos to the exact size computed from the original dimensions."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(im.resize(resized_size(*im.size, SIDE), Image.Resampling.LANCZOS)).astype(np.float64)


def median_psnr(outputs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    return round(statistics.median(10 * math.log10(255 ** 2 / max(((o - r) ** 2).mean(), 1e-12))
                                   for o, r in zip(outputs, refs) if o.shape == r.shape), 2)


def image_steps(steps: dict, photos: list[bytes], detail: list[bytes], window_s: float, windows: int) -> dict:
    """Each step's images/s (interleaved windows, one core) and the quality of its outputs."""
    refs = {"photos": [reference(d) for d in photos], "detail": [reference(d) for d in detail]}
    timed = interleaved({name: (itertools.cycle(photos + detail), step) for name, step in steps.items()}, 1,
                        window_s, windows)
    results = {}
    for name, step in steps.items():
        out = {"photos": [decoded(step(d)) for d in photos], "detail": [decoded(step(d)) for d in detail]}
        results[name] = {**timed[name], "psnr_db": median_psnr(out["photos"], refs["photos"]),
                         "psnr_detail_db": median_psnr(out["detail"], refs["detail"]),
                         "size_errors": sum(o.shape != r.shape for k in out for o, r in zip(out[k], refs[k]))}
    a, b = steps
    results[f"{b}_vs_{a}"] = round(timed["ratios"][b][a], 3)
    return results


def first_images_only(comp: Path, out: Path, count: int) -> Path:
    """A competition folder beside ``comp`` whose label file keeps the first ``count`` images only."""
    out.mkdir()
    labels = (comp / "train_human_labels.csv").read_text().splitlines()
    keep = {f"{k:016x}" for k in range(count)}
    (out / "train_human_labels.csv").write_text(
        "\n".join([labels[0]] + [r for r in labels[1:] if r.split(",")[0] in keep]) + "\n")
    for name in ("classes-trainable.csv", "class-descriptions.csv", "tuning_labels.csv"):
        (out / name).write_bytes((comp / name).read_bytes())
    (out / "stage_1_test_images").mkdir()
    return out


def build_args(layout, comp: Path, shards: Path, shard_size: int) -> list[str]:
    return ["--config", str(REPO / "config.yaml"), "--set", f"paths.original_images={layout.original_images}",
            "--set", f"paths.competition_data={comp}", "--set", f"paths.shards={shards}",
            "--set", f"data.shard_max_samples={shard_size}"]


def repack(work: Path, count: int, repeats: int) -> dict:
    """Steady images/s of packing already-resized JPEGs as is, with 1 and 2 workers, shards of 500."""
    layout = write_photo_dataset(work / "data", count, short_side=SIDE)  # JPEG q95: packed as is
    small_ids = min(2000, count)
    comp_small = first_images_only(layout.competition_data, work / "small", small_ids)

    def build(comp: Path, workers: int) -> float:
        cmd = [sys.executable, "-m", "preprocessing.build_shards", "--workers", str(workers), "--restart",
               *build_args(layout, comp, work / f"shards-{workers}-{comp.name}", 500), "--set", "data.val_fraction=0"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        return time.perf_counter() - start

    result = {"images": count, "small_images": small_ids}
    for workers in (1, 2):
        small, full = [], []
        for _ in range(repeats):  # in turn: drift hits both alike
            small.append(build(comp_small, workers))
            full.append(build(layout.competition_data, workers))
        steady = (count - small_ids) / (statistics.median(full) - statistics.median(small))
        result[f"workers_{workers}"] = {"small_s": [round(s, 2) for s in small], "full_s": [round(s, 2) for s in full],
                                        "full_s_median_min_max": [round(statistics.median(full), 2),
                                                                  round(min(full), 2), round(max(full), 2)],
                                        "startup_s": round(statistics.median(small) - small_ids / steady, 2),
                                        "steady_images_per_s": round(steady, 1)}
    result["scaling_2_vs_1"] = round(result["workers_2"]["steady_images_per_s"]
                                     / result["workers_1"]["steady_images_per_s"], 2)
    return result


def run_measured(cmd: list[str]) -> tuple[float, float]:
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


def scale(work: Path, images: int, small: int, workers: int) -> dict:
    """Build the first ``small`` and all ``images`` photographs, verify the large build, read it once."""
    from common.config import load_config
    from common.shard_format import split_shards
    from dali_pipes.loader import train_loader
    from dali_pipes.settings import PipeSettings
    result = {"images": images, "small": small, "workers": workers}
    started = time.perf_counter()
    layout = write_photo_dataset(work / "data", images)
    result["generate_seconds"] = round(time.perf_counter() - started, 1)
    comp_small = first_images_only(layout.competition_data, work / "small", small)
    build = [sys.executable, "-m", "preprocessing.build_shards", "--workers", str(workers)]
    for name, comp, count in (("small", comp_small, small), ("large", layout.competition_data, images)):
        shards, wall = work / f"shards-{name}", time.time()
        seconds, peak = run_measured(build + build_args(layout, comp, shards, 2000))
        result[f"build_{name}"] = {"images": count, "seconds": round(seconds, 1),
                                   "images_per_s": round(count / seconds, 1), "peak_rss_gb": round(peak, 3)}
    result["build_large"]["images_per_s_by_fifth"] = rate_by_fifth(
        shards, json.loads((shards / "manifest.json").read_text()), wall)
    seconds, _ = run_measured([sys.executable, "-m", "preprocessing.verify", "--workers", str(workers),
                               *build_args(layout, layout.competition_data, shards, 2000)])
    result["verify"] = {"seconds": round(seconds, 1), "images_per_s": round(images / seconds, 1)}
    cfg = load_config(REPO / "config.yaml", [f"paths.shards={shards}", "pipeline.device=cpu",
                                             f"pipeline.num_threads={workers}"])
    started, seen = time.perf_counter(), 0
    for batch, _ in train_loader(PipeSettings.from_config(cfg), split_shards(shards, "train"), 256):
        seen += len(batch)
    result["train_loader_pass"] = {"images": seen, "images_per_s": round(seen / (time.perf_counter() - started), 1)}
    per_worker = result["build_large"]["images_per_s"] / workers
    result["projection_1_74M"] = {f"{w}_workers_minutes": round(1.74e6 / (per_worker * w) / 60, 1) for w in (16, 64)}
    return result


def parts_list(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        raise argparse.ArgumentTypeError(f"'{text}': the parts are {', '.join(PARTS)}")
    return parts


@command
def main(argv=None):
    p = parser("benchmarks.shard_builder", __doc__, windows=5)
    p.add_argument("--parts", type=parts_list, default=("image_step", "repack"),
                   help=f"comma-separated, of {', '.join(PARTS)} (default: image_step,repack)")
    p.add_argument("--images", type=at_least_one, default=60,
                   help="image_step: 1024-px photographs (and a third as many detail images)")
    p.add_argument("--repeats", type=at_least_one, default=5, help="repack: builds of each size and worker count")
    p.add_argument("--repack", type=at_least_one, default=10000, help="repack: already-resized images")
    p.add_argument("--scale-images", type=at_least_one, default=50000, help="scale: images in the large build")
    p.add_argument("--scale-small", type=at_least_one, default=10000, help="scale: images in the small build")
    p.add_argument("--workers", type=at_least_one, default=usable_cores(), help="scale: builder and verify workers")
    args = p.parse_args(argv)
    results = {"cpu_count": os.cpu_count(), "usable_cores": usable_cores()}
    if "image_step" in args.parts:
        results["image_step"] = image_step_part(args)
    with tempfile.TemporaryDirectory(prefix="iic_shard_bench_") as tmp:
        if "repack" in args.parts:
            results["repack"] = repack(Path(tmp) / "repack", args.repack, args.repeats)
            one = results["repack"]["workers_1"]["steady_images_per_s"]
            results["projection_16_cores_minutes"] = round(1.74e6 / (16 * one) / 60, 1)
            print(json.dumps(results["repack"]))
            print(f"1.74 M images on 16 cores: {results['projection_16_cores_minutes']} min at the 1-worker steady "
                  "rate x 16")
        if "scale" in args.parts:
            results["scale"] = scale(Path(tmp) / "scale", args.scale_images, args.scale_small, args.workers)
            print(json.dumps(results["scale"], indent=1))
    write_json(args.json, results)


def image_step_part(args) -> dict:
    import cv2
    cv2.setNumThreads(1)  # one core, like every worker of the builder
    results = image_steps({"seed_cv2": seed_cv2, "prepare_image": ours}, photo_jpegs(args.images, long_side=1024,
                          quality=90), detail_images(max(1, args.images // 3)), args.window_s, args.windows)
    print(f"prepare_image / seed_cv2: {results['prepare_image_vs_seed_cv2']}x (median of paired windows)")
    for name in ("seed_cv2", "prepare_image"):
        r = results[name]
        print(f"{name:14s} {r['images_per_s']:8.1f} images/s (one core)  PSNR photos {r['psnr_db']:5.2f} dB  "
              f"detail {r['psnr_detail_db']:5.2f} dB  size errors {r['size_errors']}")
    return results


if __name__ == "__main__":
    main()
