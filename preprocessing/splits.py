"""Deterministic split and global shuffle (DALI shuffles only inside a small buffer)."""
from __future__ import annotations

import numpy as np

SPLIT_SALT = {"train": 0, "val": 0, "tune": 1}  # train and val come from one permutation


def permutation(n: int, seed: int, split: str) -> np.ndarray:
    return np.random.default_rng([seed & 0xFFFFFFFF, SPLIT_SALT[split]]).permutation(n)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the sorted image list) of train and val, each already in shuffled order."""
    order = permutation(n, seed, "train")
    n_val = 0 if val_fraction <= 0 or n < 2 else max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]
