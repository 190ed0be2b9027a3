"""Make an ensemble: several checkpoints that predict as one, with a decision rule chosen for their combined scores.

    python -m inference.ensemble --config config.yaml --checkpoint A.pt --checkpoint B.pt [...] --out ENSEMBLE

Predicts the tune stage's hold-out images (the same images, from data.seed and tune.holdout_fraction,
that each tuned member chose its own rule on) once, with every member from one pass of the eval
pipeline and the submission's test-time views (predict.tta); combines the members' rescored scores
(predict.ensemble_vote: 0 = their mean, k = at least k of the n members) and chooses the decision rule
on the combined scores exactly as the tune stage does for one model. Writes ENSEMBLE, a small JSON file
naming the members (paths relative to its folder, and sha256), the combination, the rule and the
hold-out, and prints every member's hold-out F2 beside the ensemble's. With tune.test_resolutions, the
hold-out is predicted from its full-size originals at each of them instead (one pass each, every member at
once), and the resolution of the best ensemble F2 is chosen with the rule, as the tune stage chooses one.
Then: python -m inference.submit --stage 2 --checkpoint ENSEMBLE
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.cli import command, config_from_args, config_parser
from common.config import Config
from common.errors import UserError
from common.paths import readable_dir, readable_file, writable_file
from common.runtime import Runtime, start_runtime
from common.tune_split import holdout_fingerprint, holdout_ids, holdout_originals, split_tune_shards, tuning_classes
from dali_pipes.loader import ImageFileLoader, eval_loader
from dali_pipes.settings import PipeSettings
from model.decision import ChosenRule, choose_rule_with_estimate, choose_test_resolution
from model.members import (Combination, check_holdout, combine_topk, load_members, member_models,
                            write_ensemble_file)
from model.predict import in_file_order, member_topk_arrays

log = logging.getLogger(__name__)


def predict_holdout(models: list, holdout, runtime: Runtime, pipes: PipeSettings, predict
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[list[int]], int]:
    """Every member's (indices, scores) over the hold-out's shards, from one pass; the true labels; the class count."""
    loader = eval_loader(pipes, holdout, predict.batch_size, tta=predict.tta)
    tops, rests, classes = member_topk_arrays(models, loader, predict.top_k, runtime.to_input, runtime.amp_dtype)
    return tops, [np.flatnonzero(t).tolist() for target, _ in rests for t in target.cpu().numpy()], classes


def predict_originals(models: list, files: list[Path], runtime: Runtime, pipes: PipeSettings, predict,
                      resolution: tuple[int, int]) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Every member's (indices, scores) over ``files`` at ``resolution``, from one pass, in the files' order."""
    loader = ImageFileLoader(pipes, files, predict.batch_size, tta=predict.tta, resolution=resolution)
    tops, rests, classes = member_topk_arrays(models, loader, predict.top_k, runtime.to_input, runtime.amp_dtype)
    return in_file_order(tops, rests), classes


def combined(tops, classes: int, k: int, combination: Combination) -> tuple[np.ndarray, np.ndarray]:
    indices, scores = combine_topk([(torch.from_numpy(i), torch.from_numpy(s)) for i, s in tops], classes, k,
                                   combination)
    return indices.numpy(), scores.numpy()


def make_ensemble(cfg: Config, checkpoints: list[Path], out: Path) -> dict:
    if len(checkpoints) < 2:
        raise UserError("an ensemble needs at least two --checkpoint")
    readable_dir(cfg.paths.shards, "paths.shards")
    writable_file(out, "--out")
    members = load_members([readable_file(Path(c), "--checkpoint") for c in checkpoints])
    combination = Combination.from_vote(cfg.predict.ensemble_vote, len(members))
    tune, predict = cfg.tune, cfg.predict
    with tempfile.TemporaryDirectory(prefix="iic_holdout_") as folder, start_runtime(cfg) as runtime:
        # the tune stage's own split, remade from the config (a few MB): the images the members were not fitted on
        _, holdout = split_tune_shards(cfg.paths.shards, Path(folder), tune.holdout_fraction, cfg.data.seed)
        fingerprint = holdout_fingerprint(holdout_ids(Path(folder)))
        check_holdout(members, fingerprint, "this config's tune hold-out")
        pipes = PipeSettings.from_config(cfg, runtime)
        models = member_models(members, cfg.model.channels_last, runtime.device.torch_device)
        seen = tuning_classes(cfg.paths.shards) if tune.unseen_class_threshold else None

        def choose(indices, scores, targets) -> ChosenRule:
            return choose_rule_with_estimate(indices, scores, targets, tune.min_class_examples, seen,
                                             tune.rule_folds, cfg.data.seed)
        if tune.test_resolutions:
            files, targets = holdout_originals(cfg.paths.shards, cfg.paths.competition_data, Path(folder))
            passes = {}

            def predict_at(resolution):
                passes[resolution] = predict_originals(models, files, runtime, pipes, predict, resolution)
                return combined(*passes[resolution], predict.top_k, combination)
            best, trials = choose_test_resolution(tune.test_resolutions, predict_at, targets, tune.min_class_examples,
                                                  seen, tune.rule_folds, cfg.data.seed)
            log.info("hold-out F2 of the ensemble by test resolution: %s; chosen %d/%d",
                     ", ".join(f"{t.resolution[0]}/{t.resolution[1]} {t.f2:.4f}" for t in trials), *best.resolution)
            chosen, tops = best.chosen, passes[best.resolution][0]
        else:
            tops, targets, classes = predict_holdout(models, holdout, runtime, pipes, predict)
            chosen = choose(*combined(tops, classes, predict.top_k, combination), targets)
    member_chosen = [choose(idx, sc, targets) for idx, sc in tops]
    write_ensemble_file(out, members, combination, chosen, fingerprint, member_chosen)
    log.info("hold-out F2 (%d images, each with its own rule chosen there), expected on new images (cross-fitted "
             "over %d folds): ensemble %.4f (%s), members %s; on the images that chose the rules: ensemble %.4f, "
             "members %s; wrote %s", len(targets), tune.rule_folds, chosen.f2_cross_fitted,
             combination.describe(len(members)), ", ".join(f"{c.f2_cross_fitted:.4f}" for c in member_chosen),
             chosen.f2_in_sample, ", ".join(f"{c.f2_in_sample:.4f}" for c in member_chosen), out)
    if chosen.f2_cross_fitted < max(c.f2_cross_fitted for c in member_chosen):
        log.warning("the ensemble scores below its best member on the hold-out: check the members "
                    "(python -m inference.submit --checkpoint on each) or try predict.ensemble_vote")
    return {"holdout_images": len(targets), "ensemble_f2": chosen.f2_in_sample,
            "ensemble_f2_cross_fitted": chosen.f2_cross_fitted, "member_f2": [c.f2_in_sample for c in member_chosen],
            "member_f2_cross_fitted": [c.f2_cross_fitted for c in member_chosen], "out": str(out)}


@command(batch_keys="predict.batch_size")
def main(argv=None):
    parser = config_parser("python -m inference.ensemble", __doc__)
    parser.add_argument("--checkpoint", type=Path, action="append", required=True,
                        help="a member's checkpoint (repeat: at least two), e.g. artifacts/tune/checkpoints/best.pt")
    parser.add_argument("--out", type=Path, required=True, help="the ENSEMBLE file to write (JSON)")
    args = parser.parse_args(argv)
    make_ensemble(config_from_args(args), args.checkpoint, args.out)


if __name__ == "__main__":
    main()
