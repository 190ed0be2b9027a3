"""Write a Kaggle submission for stage 1 or 2.

    python -m inference.submit --config config.yaml --stage 1|2 [--checkpoint CKPT|ENSEMBLE ...] [--save-scores PATH]

Reads ``stage_N_sample_submission.csv`` and ``stage_N_test_images/``, predicts every image
with the checkpoint's model through the dali_pipes test-image pipeline (``predict.tta``:
none, flip or tencrop), applies top-k rescoring and the decision rule chosen by the tune
stage (else the config's), and writes ``paths.output/submission_stageN.csv``: one row per
row of the sample submission, in its order. An image that is missing or does not decode
gets the most frequent training labels and a row in ``submission_stageN_problems.csv``;
when more than ``submit.max_fallback_fraction`` of the images would, nothing is written.
A run that fails for any reason leaves an earlier submission as it was.

An ENSEMBLE file (``python -m inference.ensemble``) as the checkpoint predicts with all its members, their
scores combined and its decision rule; several checkpoints make an unscored mix (``predict.ensemble_vote``,
the config's rule). Either way each image is decoded, resized and cropped once, for every member.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from common.atomic import atomic_write, atomic_write_csv
from common.cli import command, config_from_args, config_parser
from common.config import Config
from common.errors import UserError
from common.ids import image_path, is_plain_id
from common.paths import readable_dir, readable_file, require_file, writable_dir, writable_file
from common.runtime import start_runtime
from dali_pipes.loader import check_test_image_settings
from dali_pipes.settings import PipeSettings
from inference.file_predictions import predict_files, screen
from model.members import member_models, resolve_checkpoints

log = logging.getLogger(__name__)


def default_checkpoint(cfg: Config) -> Path:
    for stage in ("tune", "train"):
        path = cfg.paths.artifacts / stage / "checkpoints" / "best.pt"
        if path.is_file():
            return path
    raise UserError(f"no checkpoint in {cfg.paths.artifacts}/{{tune,train}}/checkpoints: train first or pass --checkpoint")


def read_sample_ids(path: Path) -> list[str]:
    table = pd.read_csv(require_file(path, "sample submission"), dtype=str, keep_default_na=False)
    if "image_id" not in table.columns:
        raise UserError(f"{path} has no image_id column")
    return [i.strip() for i in table["image_id"]]


def fallback_labels(counts: list[int] | None, n: int) -> list[int]:
    """The ``n`` most frequent training classes: better than an empty row, which scores 0."""
    if not counts:
        return list(range(n))
    return [int(c) for c in np.argsort(-np.asarray(counts), kind="stable")[:n]]


def refuse_mostly_fallback(problems: dict[int, str], ids: list[str], max_fraction: float, folder: Path) -> None:
    """A submission made mostly of fallback labels is not one: stop before anything is written. Exactly the
    fraction is allowed (counted in whole images: 0.29 x 100 is 28.999999999999996 in floating point)."""
    if len(problems) <= math.floor(max_fraction * len(ids) + 1e-9):
        return
    reasons = Counter(problems.values()).most_common(3)
    examples = ", ".join(f"{ids[i]}: {problems[i]}" for i in sorted(problems)[:3])
    raise UserError(f"{len(problems)} of {len(ids)} images cannot be predicted (more than "
                    f"submit.max_fallback_fraction = {max_fraction:g}; "
                    f"{', '.join(f'{n} {r}' for r, n in reasons)}; e.g. {examples}): is {folder} complete? "
                    "Nothing was written")


def warn_if_trained_otherwise(cfg: Config, state: dict, checkpoint: Path) -> None:
    """A model sees its images at the scale it was trained at: say so when this config's differs."""
    trained = state.get("config") or {}
    for section, key in (("data", "shortest_side"), ("pipeline", "crop_size")):
        then, now = trained.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if then is not None and then != now:
            log.warning("%s was trained with %s.%s=%s, this config says %s: predictions may suffer", checkpoint,
                        section, key, then, now)


def checkpoint_paths(cfg: Config, given: list[Path] | Path | None) -> list[Path]:
    if not given:
        return [default_checkpoint(cfg)]
    given = [given] if isinstance(given, (str, Path)) else given
    return [readable_file(Path(p), "--checkpoint") for p in given]


def submit(cfg: Config, stage: int, checkpoint: list[Path] | Path | None = None, save_scores: Path | None = None
           ) -> dict:
    check_test_image_settings(cfg.pipeline.crop_size, cfg.data.shortest_side)
    comp = readable_dir(cfg.paths.competition_data, "paths.competition_data")
    out = writable_dir(cfg.paths.output, "paths.output")  # before the long work: it is written last
    if save_scores:
        writable_file(Path(save_scores), "--save-scores")
    ids = read_sample_ids(comp / f"stage_{stage}_sample_submission.csv")
    folder = comp / f"stage_{stage}_test_images"
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    predictor = resolve_checkpoints(checkpoint_paths(cfg, checkpoint), cfg)
    for member in predictor.members:
        warn_if_trained_otherwise(cfg, member.state, member.path)
    state, rule = predictor.state, predictor.rule
    codes = state["classes"]
    resolution = rule.test_resolution
    log.info("predicting with %s; decision rule from %s%s", ", ".join(str(m.path) for m in predictor.members),
             predictor.rule_source, f"; test images resized to {resolution[0]} px, {resolution[1]}-px crops (the "
             "tune stage's choice)" if resolution else "")
    started = time.time()

    problems: dict[int, str] = {}
    files: list[Path | None] = []
    for i, image_id in enumerate(ids):
        if is_plain_id(image_id):
            files.append(image_path(folder, image_id))
        else:
            files.append(None)
            problems[i] = "bad id"
    candidates = [i for i, f in enumerate(files) if f is not None]
    reasons = screen([files[i] for i in candidates])
    problems.update({i: r for i, r in zip(candidates, reasons) if r})
    good = [i for i in candidates if i not in problems]
    # the model goes to the GPU after the screening's worker processes are done: CUDA does not survive a fork
    with start_runtime(cfg) as runtime:
        models = member_models(predictor.members, cfg.model.channels_last, runtime.device.torch_device)
        pred = predict_files(models, [files[i] for i in good], runtime, PipeSettings.from_config(cfg, runtime),
                             cfg.predict, predictor.combination, resolution)
    problems.update({good[p]: r for p, r in pred.failed.items()})

    refuse_mostly_fallback(problems, ids, cfg.submit.max_fallback_fraction, folder)
    k = pred.indices.shape[1]
    indices = np.full((len(ids), k), -1, dtype=np.int64)
    scores = np.zeros((len(ids), k), dtype=np.float32)
    indices[good], scores[good] = pred.indices, pred.scores
    predicted_rows = [i for i in good if i not in problems]
    chosen = dict(zip(predicted_rows, rule.apply(indices[predicted_rows], scores[predicted_rows])))
    fallback = fallback_labels(state.get("class_counts"), max(1, rule.min_labels))
    rows = [(image_id, " ".join(codes[c] for c in chosen.get(i, fallback))) for i, image_id in enumerate(ids)]
    submission = out / f"submission_stage{stage}.csv"
    # the submission last: a write that fails before it (a full disk) leaves the earlier one as it was
    atomic_write_csv(out / f"submission_stage{stage}_problems.csv", ["image_id", "reason"],
                     [(ids[i], problems[i]) for i in sorted(problems)])
    if save_scores:
        with atomic_write(save_scores, "wb") as f:
            np.savez_compressed(f, image_ids=np.array(ids), indices=indices, scores=scores, classes=np.array(codes),
                                predicted=np.isin(np.arange(len(ids)), predicted_rows))
    atomic_write_csv(submission, ["image_id", "labels"], rows)
    summary = {"images": len(ids), "predicted": len(predicted_rows), "fallback": len(problems),
               "seconds": round(time.time() - started, 1), "submission": str(submission),
               "checkpoint": ", ".join(str(m.path) for m in predictor.members), "members": len(predictor.members)}
    problems_file = f" (see {out / f'submission_stage{stage}_problems.csv'})" if problems else ""
    log.info(f"stage {stage}: {summary['predicted']} images predicted, {summary['fallback']} given fallback labels"
             f"{problems_file}, {summary['seconds']} s; wrote {submission}")
    return summary


@command(batch_keys="predict.batch_size")
def main(argv=None):
    parser = config_parser("python -m inference.submit", __doc__)
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True,
                        help="which test set: stage_N_sample_submission.csv and stage_N_test_images/")
    parser.add_argument("--checkpoint", type=Path, action="append",
                        help="a checkpoint, or an ENSEMBLE file from python -m inference.ensemble (its own "
                             "combination and rule: predict.ensemble_vote and the config's rule do not apply); "
                             "several checkpoints: an unscored mix (predict.ensemble_vote, the config's rule), "
                             "predicted in one pass; default: artifacts/tune (else train)/checkpoints/best.pt")
    parser.add_argument("--save-scores", type=Path, metavar="PATH",
                        help="also write the rescored top-k labels and scores (compressed .npz), for analysis")
    args = parser.parse_args(argv)
    submit(config_from_args(args), args.stage, args.checkpoint, args.save_scores)


if __name__ == "__main__":
    main()
