"""A stage's model over a whole split: each rank predicts its part with its own replica, gathered on every rank."""
from __future__ import annotations

import numpy as np

from common import distributed
from common.runtime import Runtime
from common.shard_format import SplitShards
from dali_pipes.loader import eval_loader
from dali_pipes.settings import PipeSettings
from model.decision import best_global_threshold
from model.metrics import global_average_precision
from model.predict import predict_topk
from training.stages import Validation


def predict_split(model, shards: SplitShards, validation: Validation, runtime: Runtime, pipes: PipeSettings
                  ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(indices, scores, true classes) of every image of ``shards``, each rank predicting its part with its own
    replica, gathered on every rank."""
    d = runtime.dist
    loader = eval_loader(pipes, shards, validation.batch_size, d.rank, d.world_size, tta=validation.tta)
    indices, scores, targets = [], [], []
    for idx, sc, (target, _) in predict_topk(model, loader, validation.top_k, runtime.to_input, runtime.amp_dtype):
        indices.append(idx)
        scores.append(sc)
        targets += [np.flatnonzero(t).tolist() for t in target.cpu().numpy()]
    del loader
    parts = distributed.gather_objects(d, (np.concatenate(indices), np.concatenate(scores), targets))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [t for p in parts for t in p[2]])


def validate(model, shards: SplitShards, validation: Validation, runtime: Runtime, pipes: PipeSettings) -> dict:
    """GAP over the top-k rescored scores and F2 at the best global threshold, over the whole split."""
    indices, scores, targets = predict_split(model, shards, validation, runtime, pipes)
    threshold, f2 = best_global_threshold(indices, scores, targets, 1, validation.max_labels)
    return {"val_images": len(targets), "val_gap": global_average_precision(indices, scores, targets),
            "val_f2": f2, "val_threshold": threshold}
