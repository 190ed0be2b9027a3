"""Losses, by config name (``train.loss``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_positive_softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The original loss, vectorised: each positive p is a softmax cross-entropy against the negatives only.

    ``-z_p + logsumexp({z_p} U {z_n : n not positive}) = softplus(LSE_neg - z_p)``; the batch loss is
    the sum over every positive of every image divided by the number of positives.
    """
    logits = logits.float()
    positive = targets > 0
    # a large finite value rather than -inf keeps gradients finite when a row has no negative
    masked = logits.masked_fill(positive, torch.finfo(logits.dtype).min / 2)
    lse_neg = torch.logsumexp(masked, dim=1, keepdim=True)
    per_positive = F.softplus(lse_neg - logits)
    return (per_positive * positive).sum() / positive.sum().clamp(min=1)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per class, averaged over every logit."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


LOSSES = {"per_positive_softmax": per_positive_softmax_loss, "bce": bce_loss}
