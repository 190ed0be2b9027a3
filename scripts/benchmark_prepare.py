#!/usr/bin/env python3
"""Benchmark: per-image cost of the shard builder's image step on Open-Images-sized photos.

    python scripts/benchmark_prepare.py [--images 60] [--repeats 5]

Makes 1024-px-long-side JPEGs from scikit-image's sample photographs (the size of the
Open Images originals), then times ``preprocessing.images.prepare_image`` (decode,
EXIF, RGB, resize to 256 short side, re-encode) with and without reduced-scale JPEG
decoding, and the byte-for-byte path for an already resized set. One process, medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo.photos import photo_jpegs  # noqa: E402
from preprocessing.images import prepare_image  # noqa: E402


def images_per_s(blobs: list[bytes], repeats: int, **kw) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in blobs:
            prepare_image(b, 256, 95, **kw)
        rates.append(len(blobs) / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    blobs = photo_jpegs(args.images, long_side=1024, quality=90)
    resized = [prepare_image(b, 256, 95)[0] for b in blobs]
    images_per_s(blobs[:5], 1)  # warm-up
    full = images_per_s(blobs, args.repeats, reduced_decode=False)
    reduced = images_per_s(blobs, args.repeats, reduced_decode=True)
    as_is = images_per_s(resized, args.repeats)
    print(f"{'1024-px original, full decode':40s} {full:8.1f} images/s (one core)")
    print(f"{'1024-px original, reduced-scale decode':40s} {reduced:8.1f} images/s  ({reduced / full:.2f}x)")
    print(f"{'already 256-px baseline JPEG (as is)':40s} {as_is:8.1f} images/s  ({as_is / full:.2f}x)")


if __name__ == "__main__":
    main()
