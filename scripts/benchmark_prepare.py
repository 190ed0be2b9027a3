#!/usr/bin/env python3
"""The shard builder's image step against the original solution's, and the repack rate by worker count.

    python scripts/benchmark_prepare.py [--json PATH] [--images 60] [--windows 5] [--repeats 5] [--repack 10000]

Side by side in one run, on the same inputs (one core):
- ``seed_cv2``: the original's loop (OpenCV full decode, ``cv2.resize`` with its default bilinear
  filter, ``cv2.imencode`` at its default quality 95);
- ``prepare_image``: this project's image step.
Each gets ``images_per_s`` over 1024-px photographs (scikit-image's samples, the size of the Open
Images originals) and fine-detail images (zone plates over pixel noise) together: the median (with min and
max) of --windows windows of at least --window-s seconds, the two steps taking theirs in turn, so that
``prepare_vs_seed`` is the median of the rounds' paired ratios (scripts/timing.py); and PSNR against
a full decode resized with Lanczos to the exact target size: ``psnr_db`` (photos) and
``psnr_detail_db`` (fine detail, where a plain bilinear filter aliases); ``size_errors`` counts
outputs whose size differs from the size computed from the original dimensions.

Then the repack: ``--repack`` already-resized 256-px JPEGs packed as is with 1 and 2 workers, in
shards of 500, each build in its own process as a user runs it, --repeats times (each build is a
window of many seconds: median, min and max); the steady rate is the difference between the
medians of a 2,000-image and a full build (start-up cancels out). The disk's
sequential read speed (O_DIRECT, so the page cache does not flatter it) is measured beside it,
and the time for 1.74 M images on 16 cores is projected from the 1-worker steady rate.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import busy_machine, interleaved  # noqa: E402  (scripts/timing.py)

from demo.photos import photo_jpegs, write_photo_dataset  # noqa: E402
from preprocessing.images import prepare_image, resized_size  # noqa: E402
from common.cli import command  # noqa: E402
from benchmark_args import at_least_one, positive_seconds, output_file  # noqa: E402 (scripts/)

REPO = Path(__file__).resolve().parent.parent
SIDE, QUALITY = 256, 95


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


def dali_resized(blobs: list[bytes]) -> list[np.ndarray]:
    """What inference does to a test image: DALI's decode and antialiased resize of the short side to 256."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(blobs), num_threads=1, device_id=None)
    def resize():
        jpegs = fn.external_source(source=lambda: [np.frombuffer(b, np.uint8) for b in blobs])
        return fn.resize(fn.decoders.image(jpegs, output_type=types.RGB), resize_shorter=SIDE, antialias=True)
    pipe = resize()
    pipe.build()
    out = pipe.run()[0]
    return [np.array(out.at(k)).astype(np.float64) for k in range(len(blobs))]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12))


def image_steps(steps: dict, photos, detail, refs_photos, refs_detail, window_s: float, windows: int,
                dali_photos=None) -> dict:
    """Each step's images/s (interleaved windows) and the quality of its outputs."""
    inputs = photos + detail
    timed = interleaved({name: (itertools.cycle(inputs), step) for name, step in steps.items()}, 1, window_s, windows)
    results = {}
    for name, step in steps.items():
        outputs_p, outputs_d = [decoded(step(d)) for d in photos], [decoded(step(d)) for d in detail]
        size_errors = sum(o.shape != r.shape for o, r in zip(outputs_p + outputs_d, refs_photos + refs_detail))
        close_to_dali = [psnr(o, d) for o, d in zip(outputs_p, dali_photos or []) if o.shape == d.shape]
        results[name] = {
            **timed[name],
            "psnr_vs_dali_resize_db": round(statistics.median(close_to_dali), 2) if close_to_dali else None,
            "psnr_db": round(statistics.median(psnr(o, r) for o, r in zip(outputs_p, refs_photos) if o.shape == r.shape), 2),
            "psnr_detail_db": round(statistics.median(psnr(o, r) for o, r in zip(outputs_d, refs_detail) if o.shape == r.shape), 2),
            "size_errors": size_errors}
    if len(steps) == 2:
        a, b = steps
        results[f"{b}_vs_{a}"] = round(timed["ratios"][b][a], 3)
    return results


def disk_read_mb_s(folder: Path, size_mb: int = 512) -> float:
    """Sequential read speed of the disk under ``folder``, with O_DIRECT (no page cache)."""
    path = folder / "disk_probe.bin"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    buf = mmap.mmap(-1, 4 << 20)  # page-aligned, as O_DIRECT requires
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        start, total = time.perf_counter(), 0
        while (n := os.readv(fd, [buf])) > 0:
            total += n
        return total / 1e6 / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


def repack(work: Path, count: int, repeats: int) -> dict:
    """Steady images/s of packing already-resized JPEGs as is, with 1 and 2 workers, shards of 500."""
    layout = write_photo_dataset(work / "data", count, short_side=SIDE)  # JPEG q95: packed as is
    comp_small = work / "small"
    comp_small.mkdir()
    labels = (layout.competition_data / "train_human_labels.csv").read_text().splitlines()
    small_ids = {f"{k:016x}" for k in range(min(2000, count))}
    (comp_small / "train_human_labels.csv").write_text(
        "\n".join([labels[0]] + [r for r in labels[1:] if r.split(",")[0] in small_ids]) + "\n")
    for name in ("classes-trainable.csv", "class-descriptions.csv", "tuning_labels.csv"):
        (comp_small / name).write_bytes((layout.competition_data / name).read_bytes())
    (comp_small / "stage_1_test_images").mkdir()

    def build(comp: Path, workers: int) -> float:
        out = work / f"shards-{workers}-{comp.name}"
        cmd = [sys.executable, "-m", "preprocessing.build_shards", "--config", str(REPO / "config.yaml"),
               "--workers", str(workers), "--restart", "--set", f"paths.original_images={layout.original_images}",
               "--set", f"paths.competition_data={comp}", "--set", f"paths.shards={out}",
               "--set", "data.shard_max_samples=500", "--set", "data.val_fraction=0"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        return time.perf_counter() - start

    result = {"images": count, "small_images": len(small_ids)}
    for workers in (1, 2):
        small, full = [], []
        for _ in range(repeats):  # in turn: drift hits both alike
            small.append(build(comp_small, workers))
            full.append(build(layout.competition_data, workers))
        steady = (count - len(small_ids)) / (statistics.median(full) - statistics.median(small))
        result[f"workers_{workers}"] = {"small_s": [round(s, 2) for s in small], "full_s": [round(s, 2) for s in full],
                                        "full_s_median_min_max": [round(statistics.median(full), 2),
                                                                  round(min(full), 2), round(max(full), 2)],
                                        "startup_s": round(statistics.median(small) - len(small_ids) / steady, 2),
                                        "steady_images_per_s": round(steady, 1)}
    result["scaling_2_vs_1"] = round(result["workers_2"]["steady_images_per_s"]
                                     / result["workers_1"]["steady_images_per_s"], 2)
    return result


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=at_least_one, default=60, help="1024-px photographs (and a third as many detail images)")
    parser.add_argument("--window-s", type=positive_seconds, default=2.0, help="each timed window of the image steps lasts this long")
    parser.add_argument("--windows", type=at_least_one, default=5, help="timed windows per image step")
    parser.add_argument("--repeats", type=at_least_one, default=5, help="builds of each size and worker count")
    parser.add_argument("--repack", type=int, default=10000, help="already-resized images for the repack (0: skip)")
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args(argv)
    photos = photo_jpegs(args.images, long_side=1024, quality=90)
    detail = detail_images(max(1, args.images // 3))
    refs_photos, refs_detail = [reference(d) for d in photos], [reference(d) for d in detail]
    dali_photos = dali_resized(photos)
    results = {"dali_resize_psnr_db": round(statistics.median(psnr(d, r) for d, r in zip(dali_photos, refs_photos)
                                                              if d.shape == r.shape), 2)}
    import cv2
    cv2.setNumThreads(1)  # one core, like every worker of the builder
    results.update(image_steps({"seed_cv2": seed_cv2, "prepare_image": ours}, photos, detail, refs_photos,
                               refs_detail, args.window_s, args.windows, dali_photos))
    print(f"prepare_image / seed_cv2: {results['prepare_image_vs_seed_cv2']}x (median of paired windows)")
    for name in ("seed_cv2", "prepare_image"):
        if name in results:
            r = results[name]
            print(f"{name:14s} {r['images_per_s']:8.1f} images/s (one core)  PSNR photos {r['psnr_db']:5.2f} dB  "
                  f"detail {r['psnr_detail_db']:5.2f} dB  size errors {r['size_errors']}  "
                  f"vs DALI's resize {r['psnr_vs_dali_resize_db']} dB")
    print(f"DALI's antialiased resize (inference) against the reference: {results['dali_resize_psnr_db']} dB")
    if warning := busy_machine(results):
        print(warning, file=sys.stderr)
    if args.repack:
        with tempfile.TemporaryDirectory(prefix="iic_repack_", dir=os.environ.get("TMPDIR")) as tmp:
            results["repack"] = repack(Path(tmp), args.repack, args.repeats)
            results["disk_read_mb_s"] = round(disk_read_mb_s(Path(tmp)), 1)
        one = results["repack"]["workers_1"]["steady_images_per_s"]
        results["projection_16_cores_minutes"] = round(1.74e6 / (16 * one) / 60, 1)
        results["disk_read_77gb_minutes"] = round(77e3 / results["disk_read_mb_s"] / 60, 1)
        print(json.dumps(results["repack"]))
        print(f"1.74 M images on 16 cores: {results['projection_16_cores_minutes']} min at the 1-worker steady rate "
              f"x 16; reading 77 GB at this disk's {results['disk_read_mb_s']} MB/s: "
              f"{results['disk_read_77gb_minutes']} min")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
