"""The tune stage's data: the ``tune`` shards split into a part to fit and a part to choose the rule on.

The split is a training setting (``tune.holdout_fraction``), not a data one, so it is made
here, at the start of the stage, by repacking the ~1,000 tuning samples (a few MB) into two
small shard sets with their DALI indexes.
"""
from __future__ import annotations

from pathlib import Path

from common.seeds import rng
from common.shard_format import ShardWriter, SplitShards, index_samples, iter_samples, split_shards

PARTS = ("fit", "holdout")


def tune_parts(shards_dir: Path, out_dir: Path) -> tuple[SplitShards, SplitShards]:
    """(fit, holdout) as written by ``split_tune_shards``; every rank reads them the same way."""
    source = split_shards(shards_dir, "tune")
    parts = []
    for name in PARTS:
        tar, idx = out_dir / f"{name}-000000.tar", out_dir / f"{name}-000000.idx"
        parts.append(SplitShards([tar], [idx], index_samples(idx), source.shortest_side, source.num_classes))
    return parts[0], parts[1]


def split_tune_shards(shards_dir: Path, out_dir: Path, holdout_fraction: float, seed: int) -> tuple[SplitShards, SplitShards]:
    """(fit, holdout), deterministic from the seed; rewritten on every call (it is cheap)."""
    source = split_shards(shards_dir, "tune")
    samples = sorted(({"__key__": key, **files} for tar in source.tars for key, files in iter_samples(tar)),
                     key=lambda s: s["__key__"])
    order = rng(seed, "tune_holdout").permutation(len(samples))
    n_hold = min(len(samples) - 1, max(1, round(len(samples) * holdout_fraction)))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, picked in zip(PARTS, (order[n_hold:], order[:n_hold])):
        writer = ShardWriter(out_dir, name, 0)
        for i in picked:
            writer.add(samples[i])
        writer.close()
    return tune_parts(shards_dir, out_dir)
