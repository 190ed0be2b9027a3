"""How fresh each epoch's order is: the train reader on the real run's shape, scaled down.

    python -m benchmarks.order_freshness [--images 20010] [--shards 87,870] [--ranks 1,8] [--epochs 4] [--json PATH]

The real run reads 1.74 M images; in shards of 20,000 that is 87 shards, in shards of 2,000 870, and the
shuffle buffer (``pipeline.shuffle_buffer``, 4,096) is 0.24% of an epoch. Scaled down to --images samples, the
same shard counts and the same buffer share, each rank's reader (``dali_pipes.pipelines.read_shards`` with the
seeds ``dali_pipes.loader.train_reader_seeds`` gives training) reads --epochs epochs; each sample's position
is its place in its rank's stream as a fraction of the epoch. Per pair of consecutive epochs: Spearman's rho
between the samples' positions, and their mean displacement; beside them the original's full reshuffle
(``DataLoader(shuffle=True)``: a random permutation each epoch), and the reader as it was before the tars'
order was reshuffled (``--without-shard-order``). Only the order is measured: the samples are a few bytes each.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO, at_least_one, parser, write_json
from common.cli import command
from common.config import load_config
from common.shard_format import ShardWriter, encode_sample, write_index

REAL_IMAGES, REAL_BUFFER = 1_740_000, 4096


def write_shards(folder: Path, images: int, shards: int) -> tuple[list[Path], list[Path]]:
    """``shards`` tars of ``images // shards`` samples whose class index is the sample's number."""
    per = images // shards
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        writer = ShardWriter(folder, "train", s)
        for j in range(per):
            writer.add(encode_sample(f"{s * per + j:016x}", b"-", [s * per + j], []))
        writer.close()
    tars = sorted(folder.glob("train-*.tar"))
    indexes = [t.with_suffix(".idx") for t in tars]
    for tar, idx in zip(tars, indexes):
        write_index(tar, idx)
    return tars, indexes


def positions(tars, indexes, samples: int, ranks: int, epochs: int, buffer: int, shard_order: bool,
              batch: int = 16) -> list[dict]:
    """Per epoch, {sample: its position in its rank's stream, as a fraction of the epoch}."""
    from nvidia.dali import fn, pipeline_def, types
    from common.seeds import training_seed
    from dali_pipes.loader import train_reader_seeds
    from dali_pipes.pipelines import read_shards
    cfg = load_config(REPO / "config.yaml")
    out = [dict() for _ in range(epochs)]
    steps = samples // ranks // batch
    for rank in range(ranks):
        seed, order_seed = train_reader_seeds(training_seed(cfg), 0, rank)

        @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
        def reader():
            if shard_order:
                return read_shards(tars, indexes, with_meta=False, shuffle=True, initial_fill=buffer, shard_id=rank,
                                   num_shards=ranks, seed=seed, order_seed=order_seed)[1]
            # the reader before the tars' order was reshuffled each epoch
            return fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in indexes],
                                         ext=["jpg", "labels"], dtypes=[types.UINT8, types.INT32],
                                         random_shuffle=True, initial_fill=buffer, shard_id=rank, num_shards=ranks,
                                         seed=seed)[1]
        pipe = reader()
        pipe.build()
        for epoch in range(epochs):
            for k in range(steps):
                labels = pipe.run()[0]
                for i in range(batch):
                    out[epoch][int(np.asarray(labels.at(i))[0])] = (k * batch + i) / (steps * batch)
            pipe.reset()
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of values without ties (positions): the correlation of their ranks."""
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


def freshness(epochs: list[dict]) -> dict:
    rhos, displacement = [], []
    for a, b in zip(epochs, epochs[1:]):
        common = [s for s in a if s in b]
        rhos.append(round(spearman(np.array([a[s] for s in common]), np.array([b[s] for s in common])), 4))
        displacement.append(round(float(np.mean([abs(a[s] - b[s]) for s in common])), 4))
    return {"rho_per_pair": rhos, "max_abs_rho": max(map(abs, rhos)), "mean_displacement": displacement}


def full_reshuffle(images: int, epochs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return freshness([dict(zip(rng.permutation(images).tolist(), np.arange(images) / images)) for _ in range(epochs)])


def number_list(text: str) -> list[int]:
    return [at_least_one(t) for t in text.split(",") if t.strip()]


@command
def main(argv=None):
    p = parser("benchmarks.order_freshness", __doc__)
    p.add_argument("--images", type=at_least_one, default=20010, help="samples in the scaled-down split")
    p.add_argument("--shards", type=number_list, default=[87, 870], help="shard counts (default 87,870)")
    p.add_argument("--ranks", type=number_list, default=[1, 8], help="processes (default 1,8)")
    p.add_argument("--epochs", type=at_least_one, default=4, help="epochs read (pairs: one fewer)")
    p.add_argument("--without-shard-order", action="store_true", help="also the reader without the tars' new order")
    args = p.parse_args(argv)
    buffer = max(1, round(REAL_BUFFER * args.images / REAL_IMAGES))
    results = {"images": args.images, "buffer": buffer, "full_reshuffle": full_reshuffle(args.images, args.epochs),
               "reader": []}
    print(f"original's full reshuffle: rho {results['full_reshuffle']['rho_per_pair']}")
    with tempfile.TemporaryDirectory(prefix="iic_order_") as tmp:
        for shards in args.shards:
            tars, indexes = write_shards(Path(tmp) / str(shards), args.images, shards)
            for ranks in args.ranks:
                for shard_order in (True, False) if args.without_shard_order else (True,):
                    row = {"shards": shards, "ranks": ranks, "shard_order": shard_order,
                           **freshness(positions(tars, indexes, len(tars) * (args.images // shards), ranks,
                                                     args.epochs, buffer, shard_order))}
                    results["reader"].append(row)
                    print(f"{shards:4d} shards, {ranks} rank(s){'' if shard_order else ', old reader'}: rho "
                          f"{row['rho_per_pair']}, mean displacement {row['mean_displacement']}", flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
