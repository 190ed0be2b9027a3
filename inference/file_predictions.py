"""Model predictions for a list of image files, through the dali_pipes test-image pipeline.

DALI cannot skip an image that fails to decode: the whole batch fails. So the files are
screened first (a fast full-stream decode in worker processes), and should a batch still
fail inside DALI, its images are retried one at a time, so that one bad file costs only
itself and every good image is predicted by the model. Only the loader's failures are
treated so: an error of the model (out of memory, a batch of the wrong type) stops the run.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import failure_kind
from common.image_checks import check_image_file
from common.log import progress
from common.threads import worker_count
from common.runtime import Runtime
from dali_pipes.loader import ImageFileLoader
from dali_pipes.settings import PipeSettings
from model.members import Combination
from model.predict import predict_topk

log = logging.getLogger(__name__)


def screen(files: list[Path], workers: int | None = None) -> list[str | None]:
    """Per file, the reason it cannot be predicted, or None."""
    workers = worker_count(workers, "the screening's workers")
    paths = [str(f) for f in files]
    # forkserver: workers forked from a clean server process, never from one that may hold a CUDA context
    with progress(log, total=len(paths), unit="img", desc="checking images") as bar, \
            mp.get_context("forkserver").Pool(workers) as pool:
        # the fork server imports the main module (torch with it) once, before any worker runs: the bar's clock
        # starts after that, or its first image carries those seconds and its estimate reads as an hour
        pool.apply(os.getpid)
        bar.reset()
        reasons = []
        for reason in pool.imap(check_image_file, paths, chunksize=32):
            reasons.append(reason)
            bar.update()
        return reasons


class DecodeFailed(Exception):
    """The test-image pipeline stopped on an image it could not decode."""


def guarded(make_loader):
    """The loader's batches; a DALI failure while building or reading it becomes DecodeFailed, so that it
    cannot be mistaken for an error of the model that consumes the batches."""
    try:
        batches = iter(make_loader())  # DALI decodes its first batches as soon as the loader is built
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch
    except RuntimeError as exc:
        if failure_kind(exc) != "other":  # out of memory, a fault of the GPU or its driver: no image's fault
            raise
        raise DecodeFailed(str(exc)) from exc


@dataclass
class Predictions:
    indices: np.ndarray  # [N, k] class indices, best first (rows of failed files are -1)
    scores: np.ndarray  # [N, k] rescored scores
    failed: dict[int, str]  # position -> reason, for files DALI could not decode


def predict_files(models, files: list[Path], runtime: Runtime, pipes: PipeSettings, predict,
                  combination: Combination = Combination(), resolution: tuple[int, int] | None = None
                  ) -> Predictions:
    """Every file's top-k by the model, or by several models combined (``model.members``) from one pass of the
    pipeline: each image is decoded, resized and cropped once, whatever the number of models. ``predict``: the
    config's section (top_k, batch_size, tta); ``resolution``: (short side, crop), else the training one."""
    k, step = predict.top_k, predict.batch_size
    pred = Predictions(np.full((len(files), k), -1, dtype=np.int64), np.zeros((len(files), k), dtype=np.float32), {})

    def run(positions: list[int], batch_size: int) -> int:
        """Predict ``positions``; returns how many were done before DALI failed (all, if it did not)."""
        done = 0
        batches = guarded(lambda: ImageFileLoader(pipes, [files[p] for p in positions], batch_size, tta=predict.tta,
                                                  resolution=resolution))
        try:
            for idx, sc, (local,) in predict_topk(models, batches, k, runtime.to_input, runtime.amp_dtype,
                                                  combination):
                rows = [positions[i] for i in local.tolist()]
                pred.indices[rows, : idx.shape[1]] = idx
                pred.scores[rows, : sc.shape[1]] = sc
                done += len(rows)
                bar.update(len(rows))
        except DecodeFailed:  # DALI stops the whole pipeline on one undecodable image
            pass
        return done

    with progress(log, total=len(files), unit="img", desc="predicting") as bar:
        pending = list(range(len(files)))
        while pending:
            done = run(pending, step)
            if done == len(pending):
                break
            suspects, pending = pending[done: done + step], pending[done + step:]
            for p in suspects:  # one at a time: only the bad file itself is lost
                if run([p], 1) == 0:
                    pred.failed[p] = "cannot decode (DALI)"
                    bar.update(1)
    return pred
