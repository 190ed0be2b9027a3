"""Bugs a mutation audit put into the code that the suite let pass (issue 17): each test here fails on its bug."""
import io
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

import preprocessing.resize as images_module
from common.config import load_config
from common.errors import UserError
from inference.submit import refuse_mostly_fallback
from preprocessing.build_shards import RECORDS, build_shards
from preprocessing.resize import prepare_image
from tests.fixtures import SMALL_SHARDS, write_config
from training import losses
from training.train import LossWatch, TrainingDiverged, train
from common.distributed import Dist


def test_the_first_non_finite_loss_of_a_log_interval_is_named_though_later_steps_are_finite():
    watch = LossWatch(torch.device("cpu"))
    for step, loss in enumerate([1.0, 2.0, math.nan, 3.0, math.inf, 4.0]):
        watch.add(torch.tensor(loss), step)
    total, count, bad_step, bad_value = watch.flush(Dist())
    assert (count, bad_step) == (6, 3) and math.isnan(bad_value) and total == 10.0


def test_training_names_a_single_nan_step_inside_a_log_interval(built, kaggle, tmp_path, monkeypatch):
    cfg, _ = built
    calls = []
    loss_fn = losses.per_positive_softmax_loss

    def nan_once(logits, targets):  # step 3 of the epoch alone is NaN; every later step is finite
        calls.append(1)
        loss = loss_fn(logits, targets)
        return loss * math.nan if len(calls) == 3 else loss
    monkeypatch.setitem(losses.LOSSES, "per_positive_softmax", lambda floor: nan_once)
    path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, "train:\n  batch_size: 4\n  log_every: 5\n",
                        artifacts=tmp_path / "a")
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at epoch 1, step 3;"):
        train(load_config(path, ["train.epochs=1"]), "train")


@pytest.mark.parametrize("fraction, images, allowed", [(0.05, 100, 5), (0.29, 100, 29), (0.57, 100, 57),
                                                       (0.01, 32580, 325), (0.0, 10, 0), (1.0, 7, 7)])
def test_exactly_the_fallback_fraction_is_accepted_and_one_more_refused(fraction, images, allowed, tmp_path):
    ids = [f"i{k}" for k in range(images)]
    refuse_mostly_fallback({k: "missing file" for k in range(allowed)}, ids, fraction, tmp_path)
    if allowed < images:
        with pytest.raises(UserError, match=f"{allowed + 1} of {images} images cannot be predicted"):
            refuse_mostly_fallback({k: "missing file" for k in range(allowed + 1)}, ids, fraction, tmp_path)


@pytest.mark.parametrize("side", [129, 130, 160, 255, 257, 300, 513, 600, 1029, 1100])
def test_the_scaled_decode_takes_the_smallest_scale_that_is_still_at_least_the_target(side, monkeypatch):
    """libjpeg decodes at 1/1, 1/2, 1/4 or 1/8; one step too small would be enlarged back (blurred)."""
    seen = []
    resize = images_module.cv2.resize
    monkeypatch.setattr(images_module.cv2, "resize", lambda a, size, **kw: (seen.append(a.shape[:2]),
                                                                          resize(a, size, **kw))[1])
    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side * 3 // 2, 3), dtype=np.uint8)).save(buf, format="JPEG")
    jpeg, _ = prepare_image(buf.getvalue(), 64, 90, reduced_decode=True)
    assert Image.open(io.BytesIO(jpeg)).size == (96, 64)
    if side >= 8 * 64:  # the smallest scale there is, 1/8, is still larger than the target
        assert seen == [(math.ceil(side / 8), math.ceil(side * 3 // 2 / 8))]
        return
    (h, w), = seen  # resized once, and only ever down: never enlarged back from a scale too small
    assert h >= 64 and w >= 96
    assert h <= 2 * 64 + 2  # and from the smallest scale that stays at least the target (Pillow rounds down)


def unfinished_build(kaggle, tmp_path, extra=""):
    """A build of the fixture, then its manifest removed and its records put back: as if killed at the end."""
    path = write_config(tmp_path / "c.yaml", kaggle[0], tmp_path / "s", SMALL_SHARDS + extra)
    manifest = build_shards(load_config(path), workers=1)
    out = tmp_path / "s"
    (out / RECORDS).mkdir()
    return path, out, manifest


def test_records_of_an_unfinished_build_with_other_settings_are_refused(kaggle, tmp_path):
    path, out, _ = unfinished_build(kaggle, tmp_path)
    (out / "manifest.json").unlink()
    (out / RECORDS / "train-000000.json").write_text(json.dumps(
        {"fingerprint": "another build", "split": "train", "number": 0, "shard": None, "skipped": [], "counts": {}}))
    with pytest.raises(UserError, match="holds an unfinished build with other settings or input"):
        build_shards(load_config(path), workers=1)


def test_records_left_by_a_build_killed_after_its_manifest_are_removed(kaggle, tmp_path):
    path, out, manifest = unfinished_build(kaggle, tmp_path)
    (out / RECORDS / "train-000000.json").write_text("{}")  # left behind: the run was killed before removing it
    assert build_shards(load_config(path), workers=1) == manifest
    assert not (out / RECORDS).exists()


def test_a_recorded_shard_whose_tar_was_deleted_is_built_again(kaggle, tmp_path, monkeypatch):
    import preprocessing.build_shards as builder
    records = []
    original = builder.write_reports
    monkeypatch.setattr(builder, "write_reports", lambda cfg, plan, recs, seconds: (records.extend(recs),
                                                                                   original(cfg, plan, recs, seconds))[1])
    path = write_config(tmp_path / "c.yaml", kaggle[0], tmp_path / "s", SMALL_SHARDS)
    out = tmp_path / "s"
    first = build_shards(load_config(path), workers=1)
    # as if killed after the records were written and before the manifest: records back, manifest gone
    (out / RECORDS).mkdir()
    for r in records:
        (out / RECORDS / f"{r['split']}-{r['number']:06d}.json").write_text(json.dumps(r))
    (out / "manifest.json").unlink()
    lost = first["shards"][1]["name"]
    (out / lost).unlink()
    second = build_shards(load_config(path), workers=1)
    assert (out / lost).is_file()
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]


def test_the_builder_says_when_there_are_fewer_shards_than_workers(kaggle, tmp_path, caplog):
    path = write_config(tmp_path / "c.yaml", kaggle[0], tmp_path / "s", "")  # 500 images a shard: 3 shards
    with caplog.at_level(logging.WARNING, logger="preprocessing.build_shards"):
        build_shards(load_config(path), workers=8)
    warned = [r.getMessage() for r in caplog.records if "worker(s) will idle" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("3 shard(s) to build for 8 workers: 5 worker(s) will idle")
    assert "data.shard_max_samples (now 500)" in warned[0]
