"""Losses, by config name (``train.loss``): each entry makes the loss from the ``train`` config section.

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


def check_floor(train) -> float:
    if not 0 < train.machine_label_floor <= 1:
        raise ConfigError(f"config key 'train.machine_label_floor' must be above 0 and at most 1, got "
                          f"{train.machine_label_floor}")
    return train.machine_label_floor


LOSSES = {"per_positive_softmax": lambda train: partial(per_positive_softmax_loss, floor=check_floor(train)),
          "bce": lambda train: bce_loss}
