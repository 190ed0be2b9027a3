"""Machine labels, end to end: from train_machine_labels.csv through the shards and the train loader to the loss."""
from collections import Counter

import numpy as np
import pytest
import torch

from common.config import load_config
from common.errors import UserError
from common.shard_format import decode_labels, decode_machine, iter_samples, split_shards
from common.vocab import Vocabulary
from dali_pipes.loader import multi_hot, train_loader, with_machine_labels
from preprocessing.build_shards import build_shards
from preprocessing.labels import read_human_labels, read_machine_labels
from tests.fixtures import SMALL_SHARDS, write_config, pipes
from training import losses
from training.losses import bce_loss, per_positive_softmax_loss
from training.train import train


@pytest.fixture(scope="module")
def machine_built(kaggle, tmp_path_factory):
    layout, _ = kaggle
    root = tmp_path_factory.mktemp("machine")
    cfg = load_config(write_config(root / "config.yaml", layout, root / "shards",
                                   SMALL_SHARDS + "  machine_labels: true\n"))
    return cfg, build_shards(cfg, workers=2)


def expected_machine(cfg):
    """id -> (classes, confidences) as the label readers give them."""
    comp = cfg.paths.competition_data
    vocab = Vocabulary.load(cfg.paths.shards)
    table, _ = read_human_labels(comp / "train_human_labels.csv", vocab)
    soft, _ = read_machine_labels(comp / "train_machine_labels.csv", vocab, table)
    return {image_id: soft.labels(i) for i, image_id in enumerate(table.image_ids)}


def test_the_shards_carry_each_image_s_machine_labels_and_say_so(machine_built):
    cfg, manifest = machine_built
    assert manifest["format_version"] == 3 and manifest["settings"]["machine_labels"] is True
    assert manifest["settings"]["machine_label_splits"] == ["train", "val"]
    assert manifest["labels"]["machine"]["rows_overruled_by_a_human_label"] > 0
    want = expected_machine(cfg)
    seen = 0
    for split in ("train", "val"):
        for tar in split_shards(cfg.paths.shards, split).tars:
            for key, files in iter_samples(tar):
                classes, conf = decode_machine(files)
                assert classes.tolist() == want[key][0].tolist() and np.allclose(conf, want[key][1]), key
                assert not set(classes) & set(decode_labels(files["labels"]).tolist())  # the human label won
                seen += len(classes)
    assert seen > 20
    for tar in split_shards(cfg.paths.shards, "tune").tars:
        assert all("machine_labels" not in files for _, files in iter_samples(tar))
    assert split_shards(cfg.paths.shards, "train").machine_labels
    assert not split_shards(cfg.paths.shards, "tune").machine_labels


def test_the_build_summary_says_machine_labels_are_in(machine_built, built, caplog):
    from preprocessing.build_shards import log_summary
    for (cfg, manifest), said in (machine_built, True), (built, False):
        caplog.clear()
        with caplog.at_level("INFO", logger="preprocessing.build_shards"):
            log_summary(manifest, cfg.paths.shards)
        kept = manifest["labels"].get("machine", {}).get("labels_kept", 0)
        assert (f"machine labels in train and val: {kept:,d} kept" in caplog.text) is said and (kept > 0) is said


def test_without_the_setting_the_shards_are_today_s(built):
    cfg, manifest = built
    assert "machine_labels" not in manifest["settings"] and not split_shards(cfg.paths.shards, "train").machine_labels
    for _, files in iter_samples(split_shards(cfg.paths.shards, "train").tars[0]):
        assert set(files) == {"jpg", "labels", "json"}


def test_the_train_loader_hands_over_soft_targets(machine_built):
    cfg, _ = machine_built
    shards = split_shards(cfg.paths.shards, "train")
    expected = Counter()
    for tar in shards.tars:
        for _, files in iter_samples(tar):
            row = np.zeros(shards.num_classes)
            row[decode_labels(files["labels"])] = 1
            classes, conf = decode_machine(files)
            row[classes] = conf
            expected[tuple(np.round(row, 4).tolist())] += 1
    got = Counter(tuple(np.round(t.numpy().astype(np.float64), 4).tolist()) for _, targets in train_loader(pipes(cfg), shards, 1, machine_labels=True)
                  for t in targets)
    assert got == expected
    plain = Counter(tuple(t.numpy().tolist()) for _, targets in train_loader(pipes(cfg), shards, 1) for t in targets)
    assert all(set(row) <= {0.0, 1.0} for row in plain)  # the same shards, read without them


def test_machine_labels_asked_of_shards_without_them_are_refused_in_one_line(built, tmp_path):
    cfg, _ = built
    with pytest.raises(UserError, match="built without machine labels.*data.machine_labels=false"):
        train(cfg.with_overrides(["data.machine_labels=true", f"paths.artifacts={tmp_path}"]), "train")
    assert not (tmp_path / "train").exists()


def test_training_with_machine_labels_gives_the_loss_their_confidences(machine_built, tmp_path, monkeypatch, caplog):
    cfg, _ = machine_built
    caplog.set_level("INFO", logger="training.train")
    seen = []

    def recording(floor):
        loss = losses.per_positive_softmax_loss

        def record(logits, targets):
            seen.append(targets.clone())
            return loss(logits, targets, floor=floor)
        return record
    monkeypatch.setitem(losses.LOSSES, "per_positive_softmax", recording)
    train(cfg.with_overrides(["train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=3",
                              f"paths.artifacts={tmp_path}"]), "train")
    targets = torch.cat(seen)
    assert ((targets > 0) & (targets < 1)).any()  # the machine labels' confidences reached the loss
    assert (tmp_path / "train" / "checkpoints" / "best.pt").is_file()
    assert "train: fitting on the human and the machine labels" in caplog.text


def literal_soft_loss(logits, targets, floor):
    """One image and one positive at a time: positives (target >= floor) weighted by their target, negatives the
    zero targets only."""
    total, weight = logits.new_zeros(()), 0.0
    for z, y in zip(logits, targets):
        negatives = z[y == 0]
        for p in torch.nonzero(y >= floor).flatten():
            total = total + y[p] * (-z[p] + torch.logsumexp(torch.cat([z[p:p + 1], negatives]), 0))
            weight += float(y[p])
    return total / max(weight, 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_soft_per_positive_loss_equals_its_definition(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 20, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(5, 20, generator=g) < 0.15).double()
    targets[:, 0] = 1
    soft = torch.where((torch.rand(5, 20, generator=g) < 0.2) & (targets == 0),
                       torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64)[torch.randint(0, 4, (5, 20), generator=g)],
                       targets)
    for floor in (0.5, 0.8):
        assert abs(per_positive_softmax_loss(logits.float(), soft, floor).item()
                   - literal_soft_loss(logits, soft, floor).item()) < 1e-5
    # 0/1 targets: the original loss, whatever the floor
    assert torch.isclose(per_positive_softmax_loss(logits, targets, 0.5), per_positive_softmax_loss(logits, targets))


def test_bce_is_at_rest_where_the_probability_is_the_confidence():
    logits = torch.logit(torch.tensor([[0.7, 0.2, 0.999]])).requires_grad_()
    bce_loss(logits, torch.tensor([[0.7, 0.2, 0.999]])).backward()
    assert logits.grad.abs().max() < 1e-6


def test_a_machine_label_never_lowers_a_human_positive():
    human = multi_hot(torch.tensor([[0, 2, -1]]), 4)
    soft = with_machine_labels(human, torch.tensor([[2, 3, -1]]), torch.tensor([[0.4, 0.6, 0.0]]))
    assert soft.tolist() == [[1.0, 0.0, 1.0, pytest.approx(0.6)]]


def test_a_floor_outside_0_1_is_refused():
    from common.config import ConfigError
    for floor in ("0", "1.5"):
        with pytest.raises(ConfigError, match="machine_label_floor"):
            load_config(write_config.__globals__["REPO"] / "config.yaml", [f"train.machine_label_floor={floor}"])


def test_verify_passes_machine_shards_and_repair_rebuilds_them_byte_for_byte(machine_built, tmp_path):
    import shutil
    from preprocessing.verify import repair, verify
    cfg, manifest = machine_built
    assert verify(cfg.paths.shards) == []
    shards = tmp_path / "shards"
    shutil.copytree(cfg.paths.shards, shards)
    copy = cfg.with_overrides([f"paths.shards={shards}"])
    victim = next(s for s in manifest["shards"] if s["split"] == "train")
    original = (shards / victim["name"]).read_bytes()
    (shards / victim["name"]).write_bytes(original[: len(original) // 2])
    assert verify(shards)
    assert repair(copy, [victim["name"]]) == []
    assert (shards / victim["name"]).read_bytes() == original and verify(shards) == []
