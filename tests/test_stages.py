"""The original recipe at any number of processes: stages as data, their batches, schedules and processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from model.decision import choose_rule, cross_fitted_f2
from preprocessing.build_shards import build_shards
from tests.fixtures import REPO, write_config
from training.stages import LrSchedule, train_stage, tune_stage


def test_one_process_is_the_original_recipe_exactly():
    spec = train_stage(load_config(REPO / "config.yaml"), world_size=1)
    assert (spec.processes, spec.global_batch, spec.batch_size) == (1, 32, 32)
    # 0.01, times 0.1 every 10 epochs, from the first step: no warm-up where nothing is scaled
    assert [spec.lr(e) for e in (0, 0.5, 9.99)] == [0.01] * 3
    assert spec.lr(10) == pytest.approx(1e-3) and spec.lr(19.99) == pytest.approx(1e-3)
    assert spec.lr(20) == pytest.approx(1e-4) and spec.lr(24.99) == pytest.approx(1e-4)
    assert (spec.momentum, spec.nesterov, spec.weight_decay, spec.epochs) == (0.9, True, 1e-4, 25)


def test_n_processes_scale_the_batch_and_the_rate_with_a_warm_up_and_keep_the_decay_epochs():
    spec = train_stage(load_config(REPO / "config.yaml"), world_size=4)
    assert (spec.processes, spec.global_batch, spec.batch_size) == (4, 128, 32)
    assert spec.lr(0) == pytest.approx(0.01)  # Goyal et al.: from the original rate ...
    assert spec.lr(2.5) == pytest.approx(0.025) and spec.lr(5) == pytest.approx(0.04)  # ... to 4x over 5 epochs
    assert spec.lr(9.99) == pytest.approx(0.04) and spec.lr(10) == pytest.approx(0.004)  # the same decay epochs
    assert spec.lr(20) == pytest.approx(4e-4)
    plain = train_stage(load_config(REPO / "config.yaml", ["train.lr_scaling=none"]), world_size=4)
    assert plain.global_batch == 128 and plain.lr(0) == plain.lr(5) == 0.01


def test_the_tune_stage_keeps_the_original_batch_and_steps_at_any_process_count(tmp_path):
    init = tmp_path / "w.pt"
    init.touch()
    cfg = load_config(REPO / "config.yaml")
    for world in (1, 4, 8):
        spec = tune_stage(cfg, world, init=str(init))
        assert (spec.processes, spec.global_batch) == (1, 32)
        assert spec.steps_per_epoch(700) == 21  # the original's ~21 steps an epoch on ~700 images
        assert spec.lr(0) == spec.lr(79.9) == 1e-4  # constant, as the original
    changed = tune_stage(cfg.with_overrides(["tune.batch_size=16", "tune.momentum=0.5", "tune.lr_step_epochs=40"]),
                         8, init=str(init))
    assert (changed.global_batch, changed.momentum, changed.lr(40)) == (16, 0.5, pytest.approx(1e-5))
    # the train section is the train stage's alone
    assert tune_stage(cfg.with_overrides(["train.batch_size=8", "train.momentum=0.1"]), 1,
                      init=str(init)).global_batch == 32


def test_the_stage_line_says_processes_batches_rate_and_steps():
    line = train_stage(load_config(REPO / "config.yaml"), world_size=4).describe(steps=13, started=4)
    assert line == ("train: 4 process(es), global batch 128 (32 per process), lr 0.04 (0.01 x 4, linear scaling; "
                    "warm-up from 0.01 over 5 epochs), x0.1 every 10 epochs, 224-px crops, 13 steps an epoch, "
                    "25 epochs")
    assert LrSchedule(1e-4, 1e-4, 0, 0, 0.1).describe() == "lr 0.0001, constant"


def test_the_rule_s_cross_fitted_f2_equals_a_hand_computation():
    """Five images with the same scores (class 0 at 0.9, 1 at 0.6, 2 at 0.1): three whose truth is {0} (X), two
    whose truth is {0, 1} (Y). F2 of a prediction: X: {0} 1, {0, 1} 5/6; Y: {0} 5/9, {0, 1} 1. On all five, {0, 1}
    wins (mean 9/10 against 37/45 for {0}): the in-sample figure. Five folds of five images: each image is scored by
    the rule chosen on the four others. Without an X (2 X, 2 Y) {0, 1} wins (11/12 against 7/9): the X scores 5/6;
    without a Y (3 X, 1 Y) {0} wins (8/9 against 7/8): the Y scores 5/9. Mean (3 x 5/6 + 2 x 5/9) / 5 = 13/18."""
    indices = np.tile([0, 1, 2], (5, 1))
    scores = np.tile([0.9, 0.6, 0.1], (5, 1))
    targets = [[0], [0], [0], [0, 1], [0, 1]]
    assert choose_rule(indices, scores, targets, min_class_examples=100)[1] == pytest.approx(9 / 10)
    for seed in (0, 1):  # one image a fold: whatever the order, the same figure
        assert cross_fitted_f2(indices, scores, targets, 100, folds=5, seed=seed) == pytest.approx(13 / 18)


def test_cross_fitting_deals_every_image_into_one_fold_and_repeats_with_its_seed():
    rng = np.random.default_rng(0)
    n, k = 60, 6
    targets = [sorted(set(rng.integers(0, 8, 2).tolist())) for _ in range(n)]
    indices = np.array([rng.permutation(8)[:k] for _ in range(n)])
    scores = np.sort(rng.random((n, k)), axis=1)[:, ::-1]
    a = cross_fitted_f2(indices, scores, targets, 5, folds=5, seed=3)
    assert a == cross_fitted_f2(indices, scores, targets, 5, folds=5, seed=3)
    assert 0 <= a <= 1 and np.isnan(cross_fitted_f2(indices[:1], scores[:1], targets[:1], 5))


def run_train_sh(nproc: int, cfg_path: Path, stage: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/train.sh", "--nproc-per-node", str(nproc), "--", "--config",
                           str(cfg_path), "--stage", stage, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=600,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})


def epoch_records(artifacts: Path, stage: str) -> list[dict]:
    return [r for r in map(json.loads, (artifacts / stage / "metrics.jsonl").read_text().splitlines())
            if "val_gap" in r]


SPLIT = "data:\n  val_fraction: 0.2\n"
RECIPE = """train:
  batch_size: 4
  epochs: 4
  lr_step_epochs: 3
  warmup_epochs: 0
  log_every: 1
tune:
  batch_size: 4
  epochs: 1
  holdout_fraction: 0.4
"""


@pytest.mark.slow
def test_four_processes_resumed_on_two_decay_at_the_epoch_two_decay_at_and_tune_on_one(kaggle, tmp_path):
    paths = {name: write_config(tmp_path / f"{name}.yaml", kaggle[0], tmp_path / "shards", RECIPE + SPLIT,
                                artifacts=tmp_path / name) for name in ("resumed", "two")}
    build_shards(load_config(paths["two"]), workers=1)  # a validation split that four processes can share
    r = run_train_sh(4, paths["resumed"], "train", "--set", "train.epochs=2")  # stopped after two epochs
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: 4 process(es), global batch 16 (4 per process)" in r.stdout
    for name in ("resumed", "two"):
        r = run_train_sh(2, paths[name], "train")
        assert r.returncode == 0, r.stderr[-3000:]
    base, batches = 0.1, {"resumed": [16, 16, 8, 8], "two": [8, 8, 8, 8]}  # demo config's train.lr, at batch 32
    for name, globals_ in batches.items():
        records = [json.loads(line) for line in (tmp_path / name / "train" / "metrics.jsonl").read_text().splitlines()]
        assert [r["global_batch"] for r in records if "val_gap" in r] == globals_
        # every step's rate follows its world (global batch / 32) and falls after epoch 3, in both runs: 2 epochs
        # on 4 processes are 1 epoch's worth of steps on 2, which a schedule counting steps would take for 1 epoch
        for epoch, batch in enumerate(globals_, 1):
            rates = [r["lr"] for r in records if r["epoch"] == epoch and "val_gap" not in r]
            assert rates and rates == pytest.approx([base * batch / 32 * (0.1 if epoch > 3 else 1)] * len(rates)), \
                (name, epoch, rates)

    # the tune stage under four processes: one trains it, with one process's batch and steps
    r = run_train_sh(4, paths["two"], "tune")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tune: 1 process(es) (of 4 started: this stage trains on one), global batch 4" in r.stdout
    (tuned,) = epoch_records(tmp_path / "two", "tune")
    alone = tune_stage(load_config(paths["two"]), 1)
    fit_samples = alone.data.open()[0].samples
    assert tuned["samples_per_rank"] == [alone.steps_per_epoch(fit_samples) * 4]
    assert tuned["steps"] == alone.steps_per_epoch(fit_samples) and tuned["global_batch"] == 4


def test_the_resolution_schedule_is_ffcv_s_ramp_and_the_tune_stage_trains_at_its_last_side(tmp_path):
    """FFCV's ResNet-50 at 24 epochs: 160 px until the ramp (epochs 17 to 20), 192 after, in multiples of 32."""
    cfg = load_config(REPO / "config.yaml", ["train.epochs=24", "train.resolution={start: 160, end: 192, "
                                             "start_epoch: 17, end_epoch: 20}"])
    spec = train_stage(cfg, 1)
    assert [spec.resolution(e) for e in range(24)] == [160] * 19 + [192] * 5 and spec.resizes
    assert spec.resolution.sizes(24) == [160, 192] and spec.window_px == 224
    assert "crops of 160 -> 192 px (epochs 18 to 21) from the 224-px window" in spec.describe(100, 1)
    init = tmp_path / "w.pt"
    init.touch()
    tune = tune_stage(cfg, 1, init=str(init))
    assert tune.resolution.sizes(80) == [192] and tune.resizes  # the final side, from the same window
    plain = train_stage(load_config(REPO / "config.yaml"), 1)
    assert plain.resolution.sizes(25) == [224] and not plain.resizes  # the original graph: no resize at all


def test_the_triangular_rate_rises_to_its_peak_and_falls_to_zero():
    cfg = load_config(REPO / "config.yaml", ["train.lr_schedule=triangular", "train.lr_peak_epoch=2",
                                             "train.epochs=16"])
    lr = train_stage(cfg, 4).lr  # the peak scales with the global batch as the step schedule's does
    assert lr(0) == pytest.approx(4e-6) and lr(1) == pytest.approx(0.02, rel=1e-3) and lr(2) == pytest.approx(0.04)
    assert lr(9) == pytest.approx(0.02) and lr(16) == 0.0


def test_a_run_shorter_than_its_schedules_says_what_it_will_not_reach():
    assert train_stage(load_config(REPO / "config.yaml"), 4).shortfalls() == []
    assert train_stage(load_config(REPO / "configs" / "fast.yaml"), 1).shortfalls() == []
    short = train_stage(load_config(REPO / "demo" / "config.yaml", ["train.epochs=3"]), 4).shortfalls()
    assert short == ["train: the warm-up lasts 5 epochs, the stage 3: the rate reaches 0.28, not 0.4"]
    ramp = train_stage(load_config(REPO / "demo" / "fast.yaml", ["train.epochs=4"]), 1).shortfalls()
    assert ramp == ["train: the resolution schedule ends after the stage's last epoch: its crops reach 40 px, not 56 "
                    "(the tune stage trains at 56)"]
