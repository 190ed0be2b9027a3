"""The label math of validation and the tune stage at the real task's sizes, on synthetic scores.

    python -m benchmarks.label_math [--repeats 5] [--json PATH]

``tune_rule``: ``model.decision.choose_rule`` on a held-out set shaped like the stage-1 tuning labels' (300
images, 2.4 labels each over 7,178 classes, about 32 classes with 5 or more positives, top-150 rescored scores,
500 classes seen in the tuning labels for the unseen-class threshold), as the tune stage runs it every epoch. ``validation``: the train stage's metrics for a 17,400-image validation
split, top-150 of 7,178 classes (``global_average_precision`` and ``best_global_threshold``). Each: the median
wall time (with min and max) of --repeats runs in this process, and the peak of the memory numpy allocates
during one run (``tracemalloc``). Targets: at most 0.5 s and 10 s.
"""
from __future__ import annotations

import statistics
import time
import tracemalloc

import numpy as np
import torch

from benchmarks.harness import at_least_one, parser, write_json
from common.cli import command
from model.decision import best_global_threshold, choose_rule
from model.metrics import global_average_precision, topk_rescore

CLASSES, TOP_K = 7178, 150


def held_out(images: int, labels_per_image: float, frequent: int, seed: int = 0):
    """(indices, scores, targets): half of the images' true labels drawn from ``frequent`` common classes, the
    rest from all others, their logits raised; rescored to the top ``TOP_K``."""
    rng = np.random.default_rng(seed)
    weights = np.r_[np.full(frequent, (CLASSES - frequent) / frequent), np.ones(CLASSES - frequent)]
    targets = [sorted(set(rng.choice(CLASSES, max(1, rng.poisson(labels_per_image)), p=weights / weights.sum())))
               for _ in range(images)]
    logits = torch.from_numpy(rng.normal(size=(images, CLASSES)).astype(np.float32))
    for i, t in enumerate(targets):
        logits[i, t] += torch.from_numpy(rng.uniform(1.0, 4.0, len(t)).astype(np.float32))
    indices, scores = (x.numpy() for x in topk_rescore(logits, TOP_K))
    return indices, scores.astype(np.float64), targets


def measure(run, repeats: int) -> dict:
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return {"seconds": round(statistics.median(seconds), 3), "min": round(min(seconds), 3),
            "max": round(max(seconds), 3), "repeats": repeats, "peak_numpy_mb": round(peak / 1e6, 1)}


@command
def main(argv=None):
    p = parser("benchmarks.label_math", __doc__)
    p.add_argument("--repeats", type=at_least_one, default=5, help="timed runs of each (default 5)")
    args = p.parse_args(argv)
    tune = held_out(300, 2.4, frequent=32)
    counts = np.bincount([c for t in tune[2] for c in t], minlength=CLASSES)
    extra = np.random.default_rng(2).choice(np.flatnonzero(counts == 0), 500 - int((counts > 0).sum()), replace=False)
    seen = sorted({*np.flatnonzero(counts).tolist(), *extra.tolist()})
    val = held_out(17400, 2.4, frequent=500, seed=1)
    results = {
        "tune_rule": {"images": 300, "classes_with_5_positives": int((counts >= 5).sum()),
                      "seen_classes": len(seen),
                      **measure(lambda: choose_rule(*tune, min_class_examples=5, seen_classes=seen), args.repeats)},
        "validation": {"images": 17400, "top_k": TOP_K,
                       **measure(lambda: (global_average_precision(*val), best_global_threshold(*val, 1, 5)),
                                 args.repeats)}}
    for name, target in (("tune_rule", 0.5), ("validation", 10.0)):
        r = results[name]
        print(f"{name:10s} {r['seconds']:7.3f} s (min {r['min']}, max {r['max']}; target <= {target} s), "
              f"peak numpy memory {r['peak_numpy_mb']} MB")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
