"""Deterministic split and global shuffle (DALI shuffles only inside a small buffer)."""
from __future__ import annotations

import numpy as np

from common.seeds import rng

SPLIT_PURPOSE = {"train": "train_val_split", "val": "train_val_split", "tune": "tune_order"}  # train and val: one permutation


def permutation(n: int, seed: int, split: str) -> np.ndarray:
    return rng(seed, SPLIT_PURPOSE[split]).permutation(n)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the sorted image list) of train and val, each already in shuffled order."""
    order = permutation(n, seed, "train")
    n_val = 0 if val_fraction <= 0 or n < 2 else max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]
