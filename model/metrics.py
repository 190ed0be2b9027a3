"""The original solution's scores and metrics: top-k rescoring, GAP, mean per-image F2.

Scores and metrics work on the top-k view of each image: ``indices`` ``[N, k]`` (class
indices, best first) and ``scores`` ``[N, k]``; targets are lists of class indices.
"""
from __future__ import annotations

import numpy as np
import torch


def topk_rescore(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, scores) of each image's top-k logits; score_i = softmax([z_i, z_(k+1) .. z_C]) at z_i.

    That equals ``sigmoid(z_i - LSE(logits ranked below k))``: each top label competes only
    with the labels that did not make the top k.
    """
    logits = logits.float()
    k = min(k, logits.shape[1])
    ordered, indices = logits.sort(dim=1, descending=True)
    top = ordered[:, :k]
    if k == logits.shape[1]:  # nothing ranked below: each label only against itself
        return indices, torch.ones_like(top)
    lse_rest = torch.logsumexp(ordered[:, k:], dim=1, keepdim=True)
    return indices[:, :k], torch.sigmoid(top - lse_rest)


def hits(indices: np.ndarray, targets: list[list[int]]) -> np.ndarray:
    """``[N, k]`` booleans: is the ranked label a true label of its image."""
    out = np.zeros(indices.shape, dtype=bool)
    for i, truth in enumerate(targets):
        out[i] = np.isin(indices[i], truth)
    return out


def global_average_precision(indices: np.ndarray, scores: np.ndarray, targets: list[list[int]]) -> float:
    """YouTube-8M GAP: the top-k predictions of all images pooled, sorted by score, and the
    average precision computed against the total number of true labels."""
    positives = sum(len(t) for t in targets)
    if positives == 0:
        return 0.0
    relevant = hits(indices, targets).ravel()
    order = np.argsort(-scores.ravel(), kind="stable")
    relevant = relevant[order]
    precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
    return float((precision * relevant).sum() / positives)


def f2_per_image(predicted: list[list[int]], targets: list[list[int]]) -> np.ndarray:
    """Per-image F2 (beta = 2); an image with no prediction (or no truth) scores 0. A label repeated
    within a row counts once, as scikit-learn's multi-hot rows count it."""
    out = np.zeros(len(targets))
    for i, (pred, truth) in enumerate(zip(predicted, targets)):
        pred, truth = set(pred), set(truth)
        tp = len(pred & truth)
        denominator = 5 * tp + 4 * (len(truth) - tp) + (len(pred) - tp)
        out[i] = 5 * tp / denominator if denominator else 0.0
    return out
