"""Model predictions for a list of image files, through the dali_pipes test-image pipeline.

DALI cannot skip an image that fails to decode: the whole batch fails. So the files are
screened first (a fast full-stream decode in worker processes), and should a batch still
fail inside DALI, its images are retried one at a time, so that one bad file costs only
itself and every good image is predicted by the model.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import Config
from common.images import check_image_file
from common.log import progress
from dali_pipes.device import PipeDevice
from dali_pipes.loader import ImageFileLoader, prepare_input
from model.predict import predict_topk

log = logging.getLogger(__name__)


def screen(files: list[Path], workers: int | None = None) -> list[str | None]:
    """Per file, the reason it cannot be predicted, or None."""
    workers = workers or os.cpu_count() or 1
    paths = [str(f) for f in files]
    with mp.get_context("fork").Pool(workers) as pool:
        return list(progress(log, iterable=pool.imap(check_image_file, paths, chunksize=32), total=len(paths),
                             unit="img", desc="checking images"))


@dataclass
class Predictions:
    indices: np.ndarray  # [N, k] class indices, best first (rows of failed files are -1)
    scores: np.ndarray  # [N, k] rescored scores
    failed: dict[int, str]  # position -> reason, for files DALI could not decode


def predict_files(model, files: list[Path], cfg: Config, device: PipeDevice, amp_dtype=None) -> Predictions:
    k = cfg.predict.top_k
    n = len(files)
    indices = np.full((n, k), -1, dtype=np.int64)
    scores = np.zeros((n, k), dtype=np.float32)
    failed: dict[int, str] = {}
    bar = progress(log, total=n, unit="img", desc="predicting")

    def run(positions: list[int], batch_size: int) -> int:
        """Predict ``positions``; returns how many were done before DALI failed (all, if it did not)."""
        done = 0
        try:  # the loader decodes its first batches as soon as it is built
            loader = ImageFileLoader(cfg, [files[p] for p in positions], tta=cfg.predict.tta, batch_size=batch_size,
                                     device=device)
            for idx, sc, (local,) in predict_topk(model, loader, k, lambda x: prepare_input(x, cfg), amp_dtype):
                rows = [positions[i] for i in local.tolist()]
                indices[rows, : idx.shape[1]] = idx
                scores[rows, : sc.shape[1]] = sc
                done += len(rows)
                bar.update(len(rows))
        except RuntimeError:  # DALI stops the whole pipeline on one undecodable image
            return done
        return done

    pending = list(range(n))
    while pending:  # (nothing to do for an empty list)
        done = run(pending, cfg.predict.batch_size)
        if done == len(pending):
            break
        suspects, pending = pending[done: done + cfg.predict.batch_size], pending[done + cfg.predict.batch_size:]
        for p in suspects:  # one at a time: only the bad file itself is lost
            if run([p], 1) == 0:
                failed[p] = "cannot decode (DALI)"
                bar.update(1)
    bar.close()
    return Predictions(indices, scores, failed)
