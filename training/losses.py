"""Losses, by config name (``train.loss``, ``tune.loss``): ``make_loss(name, floor)``.

Targets are ``[batch, classes]`` in [0, 1]: 1 for a human label, a machine label's confidence when the shards
carry machine labels (``data.machine_labels``), else 0.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from common.config import ConfigError


def per_positive_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, floor: float = 1.0) -> torch.Tensor:
    """The original loss, vectorised: each positive p is a softmax cross-entropy against the negatives only.

    ``-z_p + logsumexp({z_p} U {z_n : n negative}) = softplus(LSE_neg - z_p)``; the batch loss is
    the sum over every positive of every image divided by the number of positives.

    Soft targets: a target of at least ``floor`` is a positive whose term is weighted by the target (and so
    counts that much in the division), a target between 0 and ``floor`` is neither a positive nor a negative
    (an uncertain machine label is not pushed down), and only a target of 0 is a negative. With 0/1 targets this
    is exactly the original loss, whatever the floor.
    """
    logits = logits.float()
    targets = targets.float()
    weight = torch.where(targets >= floor, targets, 0.0)
    negative = targets <= 0
    # a large finite value rather than -inf keeps gradients finite when a row has no negative
    masked = logits.masked_fill(~negative, torch.finfo(logits.dtype).min / 2)
    lse_neg = torch.logsumexp(masked, dim=1, keepdim=True)
    per_positive = F.softplus(lse_neg - logits)
    return (per_positive * weight).sum() / weight.sum().clamp(min=1)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per class, averaged over every logit; a soft target is its own probability."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


# name -> the loss, made with the per-positive softmax's soft-target floor
LOSSES = {"per_positive_softmax": lambda floor: partial(per_positive_softmax_loss, floor=floor),
          "bce": lambda floor: bce_loss}


def make_loss(name: str, machine_label_floor: float = 1.0):
    """The loss called ``name`` (``train.loss``, ``tune.loss``)."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; the losses are {', '.join(LOSSES)}")
    return LOSSES[name](machine_label_floor)
