"""The test resolution, chosen on the hold-out's full-size originals, saved with the rule and used by submit."""
import json

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config
from common.vocab import Vocabulary
from dali_pipes.loader import ImageFileLoader
from model.checkpoint import load_checkpoint, save_checkpoint
from model.decision import DecisionRule, choose_test_resolution
from model.network import create_model
from tests.fixtures import REPO, pipes
from training.rule_choice import REPORT
from training.train import train


def test_the_best_resolution_wins_the_first_on_a_tie_and_its_rule_carries_it():
    rng = np.random.default_rng(0)
    targets = [[int(c)] for c in rng.integers(0, 10, 60)]

    def predict(resolution, quality={(64, 56): 0.3, (72, 64): 0.9, (80, 72): 0.9}):
        right = rng.random(len(targets)) < quality[resolution]
        top = np.array([[t[0] if ok else (t[0] + 1) % 10, (t[0] + 2) % 10] for t, ok in zip(targets, right)])
        return top, np.tile([0.9, 0.1], (len(targets), 1))
    best, trials = choose_test_resolution([(64, 56), (72, 64), (80, 72)], predict, targets, 5)
    assert [t.resolution for t in trials] == [(64, 56), (72, 64), (80, 72)]
    assert best.f2 == max(t.f2 for t in trials) and best.rule.test_resolution == best.resolution
    assert best.resolution != (64, 56)
    tied, _ = choose_test_resolution([(72, 64), (72, 64)], lambda r: predict(r, {(72, 64): 1.0}), targets, 5)
    assert tied is _[0]


def test_a_rule_keeps_its_resolution_and_an_old_rule_has_none():
    rule = DecisionRule(0.4, 1, 3, test_resolution=(292, 256))
    assert DecisionRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    old = {"threshold": 0.5, "min_labels": 2, "max_labels": 5, "class_thresholds": {}}
    assert DecisionRule.from_dict(old).test_resolution is None


def test_the_file_loader_crops_at_the_resolution_asked(kaggle, built):
    cfg, _ = built
    files = sorted((kaggle[0].competition_data / "stage_1_test_images").glob("*.jpg"))[:4]
    images, _ = next(iter(ImageFileLoader(pipes(cfg), files, 4, resolution=(80, 72))))
    assert images.shape[1:3] == (72, 72)
    images, _ = next(iter(ImageFileLoader(pipes(cfg), files, 4)))
    assert images.shape[1:3] == (cfg.pipeline.crop_size,) * 2


@pytest.mark.parametrize("value", ["[[64, 72]]", "[[64]]", "[64, 56]", "[[0, 0]]"])
def test_bad_candidates_are_one_line(value):
    with pytest.raises(ConfigError, match="tune.test_resolutions"):
        load_config(REPO / "config.yaml", [f"tune.test_resolutions={value}"])


def test_the_tune_stage_chooses_saves_and_submit_uses_it(built, tmp_path, monkeypatch):
    cfg, manifest = built
    vocab = Vocabulary.load(cfg.paths.shards)
    torch.manual_seed(0)
    start = tmp_path / "start.pt"
    save_checkpoint(start, {"model": create_model("test_resnet", len(vocab)).state_dict(),
                            "model_name": "test_resnet", "classes": vocab.codes})
    cfg = cfg.with_overrides([f"paths.artifacts={tmp_path / 'a'}", f"paths.output={tmp_path / 'out'}",
                              "tune.epochs=1", "tune.batch_size=4", "predict.tta=none",
                              "tune.test_resolutions=[[64, 56], [80, 72]]", "submit.max_fallback_fraction=0.5"])
    train(cfg, "tune", init=str(start))
    best = load_checkpoint(tmp_path / "a" / "tune" / "checkpoints" / "best.pt")
    rule = DecisionRule.from_dict(best["decision_rule"])
    report = json.loads((tmp_path / "a" / "tune" / REPORT).read_text())
    assert [(c["short_side"], c["crop"]) for c in report["candidates"]] == [(64, 56), (80, 72)]
    chosen = max(report["candidates"], key=lambda c: c["f2_in_sample"])  # the first best, as max takes it
    assert rule.test_resolution == tuple(report["chosen_resolution"]) == (chosen["short_side"], chosen["crop"])
    assert all(0 <= c["f2_cross_fitted"] <= 1 for c in report["candidates"])
    assert report["holdout_images"] == best["holdout"]["images"]

    import inference.submit as submit_module
    used = []
    real = submit_module.predict_files

    def spy(*args, **kw):
        used.append(args[6] if len(args) > 6 else kw.get("resolution"))  # (models, files, runtime, pipes, ...)
        return real(*args, **kw)
    monkeypatch.setattr(submit_module, "predict_files", spy)
    submit_module.submit(cfg, 1, tmp_path / "a" / "tune" / "checkpoints" / "best.pt")
    assert used == [rule.test_resolution]

    best_path = tmp_path / "a" / "tune" / "checkpoints" / "best.pt"
    written = best_path.stat().st_mtime_ns
    train(cfg, "tune", init=str(start))  # the same candidates: the choice stands
    assert best_path.stat().st_mtime_ns == written
    other = cfg.with_overrides(["tune.test_resolutions=[[72, 64]]"])
    train(other, "tune", init=str(start))  # other candidates on the finished stage: chosen again
    report = json.loads((tmp_path / "a" / "tune" / REPORT).read_text())
    assert [(c["short_side"], c["crop"]) for c in report["candidates"]] == [(72, 64)]
    assert DecisionRule.from_dict(load_checkpoint(best_path)["decision_rule"]).test_resolution == (72, 64)
