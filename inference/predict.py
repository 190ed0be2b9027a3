"""Model predictions for a list of image files, through the dali_pipes test-image pipeline.

DALI cannot skip an image that fails to decode: the whole batch fails. So the files are
screened first (a fast full-stream decode in worker processes), and should a batch still
fail inside DALI, its images are retried one at a time, so that one bad file costs only
itself and every good image is predicted by the model.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import Config
from dali_pipes.device import PipeDevice
from dali_pipes.loader import ImageFileLoader, view_averaged_logits
from preprocessing.images import ImageProblem, verify_image
from training.metrics import topk_rescore


def screen_one(path: str) -> str | None:
    """The reason a file cannot be predicted, or None."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return "missing file"
    except OSError as exc:
        return f"unreadable file ({exc.strerror or exc})"
    try:
        verify_image(data)
    except ImageProblem as exc:
        return str(exc)
    return None


def screen(files: list[Path], workers: int | None = None, show_progress: bool = True) -> list[str | None]:
    workers = workers or os.cpu_count() or 1
    paths = [str(f) for f in files]
    with mp.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(screen_one, paths, chunksize=32), total=len(paths), unit="img",
                         desc="checking images", disable=not show_progress))


@dataclass
class Predictions:
    indices: np.ndarray  # [N, k] class indices, best first (rows of failed files are -1)
    scores: np.ndarray  # [N, k] rescored scores
    failed: dict[int, str]  # position -> reason, for files DALI could not decode


def predict_files(model, files: list[Path], cfg: Config, device: PipeDevice, amp_dtype=None,
                  show_progress: bool = True) -> Predictions:
    k = cfg.submit.top_k
    n = len(files)
    indices = np.full((n, k), -1, dtype=np.int64)
    scores = np.zeros((n, k), dtype=np.float32)
    failed: dict[int, str] = {}
    model.eval()
    bar = tqdm(total=n, unit="img", desc="predicting", disable=not show_progress, dynamic_ncols=True)

    def run(positions: list[int], batch_size: int) -> int:
        """Predict ``positions``; returns how many were done before DALI failed (all, if it did not)."""
        done = 0
        try:  # the loader decodes its first batches as soon as it is built
            loader = ImageFileLoader(cfg, [files[p] for p in positions], tta=cfg.submit.tta, batch_size=batch_size,
                                     device=device)
            for images, local in loader:
                idx, sc = topk_rescore(view_averaged_logits(model, images, cfg, amp_dtype), k)
                rows = [positions[i] for i in local.tolist()]
                indices[rows, : idx.shape[1]] = idx.cpu().numpy()
                scores[rows, : sc.shape[1]] = sc.cpu().numpy()
                done += len(rows)
                bar.update(len(rows))
        except RuntimeError:  # DALI stops the whole pipeline on one undecodable image
            return done
        return done

    pending = list(range(n))
    while pending:  # (nothing to do for an empty list)
        done = run(pending, cfg.submit.batch_size)
        if done == len(pending):
            break
        suspects, pending = pending[done: done + cfg.submit.batch_size], pending[done + cfg.submit.batch_size:]
        for p in suspects:  # one at a time: only the bad file itself is lost
            if run([p], 1) == 0:
                failed[p] = "cannot decode (DALI)"
                bar.update(1)
    bar.close()
    return Predictions(indices, scores, failed)
