"""After a stage with a hold-out (the tune stage): the decision rule, and the test resolution where candidates are
given, chosen on ``best.pt``'s predictions of the hold-out and saved in ``best.pt``; ``report.json`` beside it.

``best.pt`` was picked by the hold-out's GAP, a figure no rule enters. The rule is then fitted to the hold-out, so
its F2 there is optimistic; the figure to expect on new images is the same choice cross-fitted over folds of the
hold-out (``model.decision.cross_fitted_f2``). The report gives both, and the log line says which is which.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from common.atomic import atomic_write_text
from common.runtime import Runtime
from common.shard_format import SplitShards
from common.tune_split import holdout_originals, tuning_classes
from dali_pipes.loader import ImageFileLoader
from dali_pipes.settings import PipeSettings
from model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model.decision import ChosenRule, choose_rule_with_estimate, choose_test_resolution
from model.predict import in_file_order, member_topk_arrays
from training.validation import predict_split

log = logging.getLogger(__name__)

REPORT = "report.json"


def report_settings(spec, saved: dict) -> dict:
    """What a report's choice depends on: a report made with other settings, or for another best.pt, is redone."""
    rule = spec.rule
    return {"best_epoch": saved.get("epoch"), "tta": spec.validation.tta, "top_k": spec.validation.top_k,
            "min_class_examples": rule.min_class_examples, "unseen_class_threshold": rule.unseen_class_threshold,
            "folds": rule.folds, "test_resolutions": [list(r) for r in rule.test_resolutions]}


def report_matches(path, settings: dict) -> bool:
    try:
        return json.loads(path.read_text()).get("settings") == settings
    except (OSError, ValueError, AttributeError):
        return False


def predict_originals(model, files, resolution, runtime: Runtime, pipes: PipeSettings, validation
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of full-size image files at (short side, crop), in the files' order."""
    loader = ImageFileLoader(pipes, files, validation.batch_size, tta=validation.tta, resolution=resolution)
    tops, rests, _ = member_topk_arrays([model], loader, validation.top_k, runtime.to_input, runtime.amp_dtype)
    return in_file_order(tops, rests)[0]


def _figures(chosen: ChosenRule) -> dict:
    return {"f2_in_sample": round(chosen.f2_in_sample, 5), "f2_cross_fitted": round(chosen.f2_cross_fitted, 5)}


def choose_after_fit(spec, holdout: SplitShards, runtime: Runtime, pipes: PipeSettings) -> None:
    """Choose (or keep, when ``report.json`` was made with these settings for this best.pt) the rule."""
    rule, best_path, report_path = spec.rule, spec.checkpoints / "best.pt", spec.out / REPORT
    if not best_path.is_file():
        return
    saved = load_checkpoint(best_path)
    settings = report_settings(spec, saved)
    if saved.get("decision_rule") and report_matches(report_path, settings):
        log.info("%s: the decision rule of %s was already chosen with these settings (%s)", spec.name, best_path,
                 report_path)
        return
    model = model_from_checkpoint(saved, pipes.channels_last).to(runtime.device.torch_device).eval()
    seen = tuning_classes(spec.data.shards) if rule.unseen_class_threshold else None
    report = {"settings": settings, "best_by": spec.best_by, "best_epoch": saved["epoch"],
              f"holdout_{spec.best_by.removeprefix('val_')}": saved.get("metric"), "folds": rule.folds,
              "tuning_label_classes": None if seen is None else len(seen)}
    if rule.test_resolutions:  # from the hold-out's full-size originals, as a submission reads test images
        files, targets = holdout_originals(spec.data.shards, rule.originals, spec.data.folder)
        best, trials = choose_test_resolution(
            rule.test_resolutions, lambda r: predict_originals(model, files, r, runtime, pipes, spec.validation),
            targets, rule.min_class_examples, seen, rule.folds, rule.seed)
        chosen = best.chosen
        report["candidates"] = [{"short_side": t.resolution[0], "crop": t.resolution[1], **_figures(t.chosen)}
                                for t in trials]
        report["chosen_resolution"] = list(best.resolution)
    else:
        indices, scores, targets = predict_split(model, holdout, spec.validation, runtime, pipes)
        chosen = choose_rule_with_estimate(indices, scores, targets, rule.min_class_examples, seen, rule.folds,
                                           rule.seed)
    report.update(holdout_images=len(targets), **_figures(chosen), rule=chosen.rule.to_dict())
    saved["decision_rule"] = chosen.rule.to_dict()
    save_checkpoint(best_path, saved)
    atomic_write_text(report_path, json.dumps(report, indent=1) + "\n")
    log.info(describe(spec.name, report, chosen))


def describe(stage: str, report: dict, chosen: ChosenRule) -> str:
    """The report in one line, each figure named for what it is."""
    figure = report["best_by"].removeprefix("val_")
    text = (f"{stage}: best.pt is epoch {report['best_epoch']} (hold-out {figure.upper()} "
            f"{report[f'holdout_{figure}']:.4f}); its decision rule, chosen on the hold-out's "
            f"{report['holdout_images']} images: F2 {chosen.f2_cross_fitted:.4f} expected on new images (cross-fitted "
            f"over {chosen.folds} folds), {chosen.f2_in_sample:.4f} on the images that chose it")
    if report.get("tuning_label_classes") is not None:  # the unseen-class threshold was sought
        unseen = chosen.rule.unseen_threshold
        text += ("; classes the tuning labels never show: " + (f"above {unseen:.2f}" if unseen is not None
                                                               else "the global threshold, none better"))
    if "candidates" in report:
        text += "; test resolution " + ", ".join(
            f"{c['short_side']}/{c['crop']} F2 {c['f2_in_sample']:.4f} ({c['f2_cross_fitted']:.4f} cross-fitted)"
            for c in report["candidates"]) + " -> chosen {}/{}".format(*report["chosen_resolution"])
    return text
