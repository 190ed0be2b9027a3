"""The original solution's loader, rebuilt: PyTorch DataLoader workers, PIL decoding, torchvision transforms.

Reads the same shards with the ``webdataset`` library, each pass in a fresh shard order and through a shuffle
buffer as the original's DataLoader(shuffle=True) approximated on a stream. The throughput benchmark measures the
DALI loaders against it, and tests compare their batches with it; training uses the DALI loaders.
"""
from __future__ import annotations

import os

import torch
import webdataset as wds
from torch.utils.data import DataLoader
from torchvision import transforms

from common.config import Config
from common.shard_format import SplitShards, decode_labels, split_shards
from dali_pipes.loader import multi_hot


def train_transform(resize_shorter: int, crop: int, mean, std):
    """The original recipe: resize short side, random crop, random flip, ImageNet normalisation."""
    return transforms.Compose([transforms.Resize(resize_shorter), transforms.RandomCrop(crop),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def eval_transform(resize_shorter: int, crop: int, mean, std):
    return transforms.Compose([transforms.Resize(resize_shorter), transforms.CenterCrop(crop),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def _collate(samples):
    images = torch.stack([s[0] for s in samples])
    lists = [decode_labels(s[1]) for s in samples]
    padded = torch.full((len(lists), max(len(x) for x in lists)), -1, dtype=torch.int32)
    for i, x in enumerate(lists):
        padded[i, :len(x)] = torch.from_numpy(x.copy())
    return images, padded


def baseline_loader(cfg: Config, split: str = "train", train: bool = True, batch_size: int | None = None,
                    num_workers: int | None = None, shards: SplitShards | None = None):
    """Yields (images float32 NCHW, multi-hot targets) on the CPU, like the original's DataLoader."""
    shards = shards or split_shards(cfg.paths.shards, split)
    p = cfg.pipeline
    batch_size = batch_size or cfg.train.batch_size
    workers = num_workers if num_workers is not None else (p.baseline_workers or os.cpu_count() or 1)
    transform = (train_transform(cfg.data.shortest_side, p.crop_size, p.mean, p.std) if train
                 else eval_transform(cfg.data.shortest_side, p.crop_size, p.mean, p.std))
    dataset = (wds.WebDataset([str(t) for t in shards.tars], shardshuffle=len(shards.tars) if train else False,
                              nodesplitter=wds.single_node_only if train else None,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .shuffle(p.shuffle_buffer if train else 0)
               .decode("pil")
               .to_tuple("jpg", "labels")
               .map_tuple(transform, lambda b: b)
               .batched(batch_size, collation_fn=_collate, partial=not train))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    class _Loader:
        def __iter__(self):
            for images, padded in loader:
                yield images, multi_hot(padded, shards.num_classes)

        def close(self):
            """Stop the workers now. A persistent worker still prefetching when the DataLoader is dropped
            does not see the shutdown signal, and DataLoader waits 5 s per worker before killing it."""
            for worker in getattr(getattr(loader, "_iterator", None), "_workers", []):
                worker.terminate()

    return _Loader()
