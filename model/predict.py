"""Top-k rescored predictions of a model, or of several (an ensemble), over a loader's batches: one loop for
validation, the ensemble's hold-out and submissions."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from model.members import Combination, combine_topk
from model.metrics import topk_rescore


def view_averaged_logits(model, x: torch.Tensor, amp_dtype=None) -> torch.Tensor:
    """The model's float32 logits per image, averaged over test-time views (``[B, V, C, H, W]`` input)."""
    views = x.shape[1] if x.dim() == 5 else 1
    with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x.flatten(0, 1) if views > 1 else x).float()
    return logits.view(-1, views, logits.shape[-1]).mean(1)


def _as_list(models) -> list:
    return list(models) if isinstance(models, (list, tuple)) else [models]


@torch.no_grad()
def predict_member_topk(models, batches: Iterable[tuple], k: int, to_input: Callable[[torch.Tensor], torch.Tensor],
                        amp_dtype=None) -> Iterator[tuple[list[tuple[torch.Tensor, torch.Tensor]], int, tuple]]:
    """For each ``(images, *rest)`` batch: every model's ``(indices [B, k], scores [B, k])`` on the device, the
    number of classes, and ``rest``. The batch is made the models' input once, whatever the number of models
    (``to_input``: ``common.runtime.InputAdapter``). The models are in eval mode while this runs and back
    in their former modes afterwards."""
    models = _as_list(models)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for images, *rest in batches:
            x = to_input(images)
            tops, classes = [], 0
            for m in models:
                logits = view_averaged_logits(m, x, amp_dtype)
                classes = logits.shape[1]
                tops.append(topk_rescore(logits, k))
            yield tops, classes, tuple(rest)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)


def member_topk_arrays(models, batches: Iterable[tuple], k: int, to_input: Callable[[torch.Tensor], torch.Tensor],
                       amp_dtype=None) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple], int]:
    """Every model's (indices, scores) over one pass of ``batches``, on the host; each batch's ``rest``; the class
    count."""
    models = _as_list(models)
    per_model: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in models]
    rests, classes = [], 0
    for tops, classes, rest in predict_member_topk(models, batches, k, to_input, amp_dtype):
        for m, (idx, sc) in enumerate(tops):
            per_model[m].append((idx.cpu().numpy(), sc.cpu().numpy()))
        rests.append(rest)
    return ([(np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
             for batches in per_model], rests, classes)


def in_file_order(tops: list[tuple[np.ndarray, np.ndarray]], rests: list[tuple]
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``tops`` of a pass over image files (whose batches' rest is the images' positions in the list of files,
    as ``dali_pipes.loader.ImageFileLoader`` gives them) in the files' order."""
    order = np.argsort(np.concatenate([positions.view(-1).cpu().numpy() for positions, in rests]))
    return [(idx[order], sc[order]) for idx, sc in tops]


def predict_topk(models, batches: Iterable[tuple], k: int, to_input: Callable[[torch.Tensor], torch.Tensor],
                 amp_dtype=None, combination: Combination = Combination()) -> Iterator[tuple[np.ndarray, np.ndarray, tuple]]:
    """For each ``(images, *rest)`` batch: ``(indices [B, k], scores [B, k], rest)``, best first, rescored; with
    several models, their scores combined as ``combination`` says (``model.members``)."""
    for tops, classes, rest in predict_member_topk(models, batches, k, to_input, amp_dtype):
        indices, scores = combine_topk(tops, classes, k, combination)
        yield indices.cpu().numpy(), scores.cpu().numpy(), rest
