"""Every random stream of the project from one derivation: a seed and a purpose (and, where it matters, an
epoch and a rank) through ``numpy.random.SeedSequence``. The data's streams (splits, the tune hold-out) take
``data.seed``; a training run's (initial weights, the readers' shuffles and augmentation, dropout) take
``training_seed``: ``train.seed``, or ``data.seed`` where it is unset, so that runs from before it existed
keep their results and ensemble members can differ in it alone while sharing the same shards.

Streams of different purposes, epochs or ranks are independent, and each depends on nothing
but these numbers, so a resumed run draws what an uninterrupted one would. The purpose numbers
are part of the output: the train/val split (0, the original solution's seed), the tune shards'
order (1) and the tune hold-out (2) keep the values they had before this module existed.
"""
from __future__ import annotations

import numpy as np

PURPOSES = {"train_val_split": 0, "tune_order": 1, "tune_holdout": 2, "train_reader": 3, "model_init": 4,
            "train_shard_order": 5, "rule_folds": 6}


def training_seed(cfg) -> int:
    """The seed of everything a training run draws (``train.seed``; ``data.seed`` when it is null)."""
    return cfg.data.seed if cfg.train.seed is None else cfg.train.seed


def seed_sequence(seed: int, purpose: str, *parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed & 0xFFFFFFFF, PURPOSES[purpose], *parts])


def rng(seed: int, purpose: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng(seed_sequence(seed, purpose, *parts))


def int_seed(seed: int, purpose: str, *parts: int) -> int:
    """A non-negative 31-bit seed, for APIs that take one integer (DALI, torch.manual_seed)."""
    return int(seed_sequence(seed, purpose, *parts).generate_state(1)[0]) & 0x7FFFFFFF
