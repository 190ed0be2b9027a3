"""Top-k rescored predictions of a model over a loader's batches: one loop for validation and submissions."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from model.metrics import topk_rescore


def view_averaged_logits(model, x: torch.Tensor, amp_dtype=None) -> torch.Tensor:
    """The model's float32 logits per image, averaged over test-time views (``[B, V, C, H, W]`` input)."""
    views = x.shape[1] if x.dim() == 5 else 1
    with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x.flatten(0, 1) if views > 1 else x).float()
    return logits.view(-1, views, logits.shape[-1]).mean(1)


@torch.no_grad()
def predict_topk(model, batches: Iterable[tuple], k: int, to_input: Callable[[torch.Tensor], torch.Tensor],
                 amp_dtype=None) -> Iterator[tuple[np.ndarray, np.ndarray, tuple]]:
    """For each ``(images, *rest)`` batch: ``(indices [B, k], scores [B, k], rest)``, best first, rescored.

    ``to_input`` turns a loader's images into the model's input (``dali_pipes.loader.prepare_input``).
    The model is in eval mode while this runs and back in its former mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        for images, *rest in batches:
            indices, scores = topk_rescore(view_averaged_logits(model, to_input(images), amp_dtype), k)
            yield indices.cpu().numpy(), scores.cpu().numpy(), tuple(rest)
    finally:
        model.train(was_training)
