"""Ensembles: train.seed, the combination, inference.ensemble's rule and file, one-pass submissions, bad input."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from common.config import load_config
from common.seeds import training_seed
from common.shard_format import split_shards
from common.vocab import Vocabulary
from common.device import resolve_device
from dali_pipes.loader import build_train_pipeline, eval_loader
from inference import file_predictions as predict_module
from inference.ensemble import main as ensemble_main
from inference.file_predictions import predict_files
from inference.submit import main as submit_main, submit
from model.checkpoint import load_checkpoint, save_checkpoint
from model.decision import DecisionRule, choose_rule
from model.members import Combination, combine_topk
from model.network import create_model
from model.predict import predict_topk
from tests.fixtures import corrupt_huffman_table, cpu_runtime, jpeg_bytes, photo, pipes, run_main, to_input, write_config
from training.stages import train_stage, tune_stage
from training.train import create_train_state
from common.tune_split import holdout_fingerprint, holdout_ids, split_tune_shards, tuning_classes


# ---- the combination ----------------------------------------------------------------------------------------

def random_tops(rng, members: int, batch: int, classes: int, k: int):
    tops = []
    for _ in range(members):
        scores = torch.from_numpy(rng.random((batch, classes)).astype(np.float32))
        top = scores.topk(k, dim=1)
        tops.append((top.indices, top.values))
    return tops


def dense(tops, classes):
    out = np.zeros((len(tops), tops[0][0].shape[0], classes), dtype=np.float32)
    for m, (idx, sc) in enumerate(tops):
        for i in range(idx.shape[0]):
            out[m, i, idx[i].numpy()] = sc[i].numpy()
    return out


def test_mean_averages_the_members_rescored_scores_counting_a_class_outside_a_top_k_as_zero():
    rng = np.random.default_rng(0)
    tops = random_tops(rng, 3, 4, 12, 5)
    idx, sc = combine_topk(tops, 12, 5, Combination())
    expected = dense(tops, 12).mean(0)
    for i in range(4):
        order = np.argsort(-expected[i], kind="stable")[:5]
        assert np.allclose(sc[i].numpy(), expected[i][order])
        assert np.allclose(expected[i][idx[i].numpy()], sc[i].numpy())  # the indices name those scores


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_threshold_on_a_vote_keeps_exactly_the_labels_k_members_score_above_it(k):
    rng = np.random.default_rng(k)
    tops = random_tops(rng, 3, 6, 10, 10)  # every class in every member's top k
    idx, sc = combine_topk(tops, 10, 10, Combination("vote", k))
    member = dense(tops, 10)
    for t in (0.2, 0.5, 0.8):
        for i in range(6):
            kept = set(idx[i][sc[i] > t].tolist())
            agreed = {c for c in range(10) if (member[:, i, c] > t).sum() >= k}
            assert kept == agreed


def test_one_member_passes_through_unchanged():
    tops = random_tops(np.random.default_rng(1), 1, 3, 8, 4)
    idx, sc = combine_topk(tops, 8, 4, Combination("vote", 1))
    assert idx is tops[0][0] and sc is tops[0][1]


# ---- train.seed ---------------------------------------------------------------------------------------------

def test_train_seed_moves_weights_and_shuffles_but_not_the_splits(built):
    cfg, _ = built
    assert cfg.train.seed is None and training_seed(cfg) == cfg.data.seed  # runs from before it keep results
    same = cfg.with_overrides([f"train.seed={cfg.data.seed}"])
    other = cfg.with_overrides(["train.seed=7"])
    shards = split_shards(cfg.paths.shards, "train")
    device = resolve_device("cpu")

    def first_batch(c):
        pipe = build_train_pipeline(pipes(c, device), shards, 4)
        images, labels, *_ = pipe.run()
        return np.array(images.as_tensor()), np.array(labels.as_tensor())

    base = first_batch(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(base, first_batch(same)))
    assert not np.array_equal(base[0], first_batch(other)[0])  # another order and other crops

    def weights(c):
        state = create_train_state(train_stage(c, 1), c.model, 10, torch.device("cpu"), None, training_seed(c))
        return torch.cat([p.detach().flatten() for p in state.model.parameters()])

    assert torch.equal(weights(cfg), weights(same)) and not torch.equal(weights(cfg), weights(other))


def test_members_that_differ_in_train_seed_share_the_tune_holdout(built, tmp_path):
    cfg, _ = built
    init = tmp_path / "weights.pt"  # the stage's starting weights must exist; its data does not read them
    init.touch()
    for seed, folder in ((None, "a"), (7, "b")):
        c = cfg.with_overrides([f"train.seed={'null' if seed is None else seed}",
                                f"paths.artifacts={tmp_path / folder}"])
        tune_stage(c, 1, init=str(init)).data.open()
    assert holdout_ids(tmp_path / "a" / "tune" / "data") == holdout_ids(tmp_path / "b" / "tune" / "data")


# ---- inference.ensemble and submit --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def members(built, kaggle, tmp_path_factory):
    """Two random-weight 'tuned' members (recording the config's hold-out), a config, the competition folder."""
    cfg, manifest = built
    layout = kaggle[0]
    root = tmp_path_factory.mktemp("ensemble")
    comp = root / "inclusive"
    shutil.copytree(layout.competition_data, comp)
    cfg_path = write_config(root / "c.yaml", type("L", (), {"original_images": layout.original_images,
                                                           "competition_data": comp}),
                            cfg.paths.shards, "predict:\n  tta: flip\n  batch_size: 8\n"
                            "submit:\n  max_fallback_fraction: 0.2\n", output=root / "out")
    cfg = load_config(cfg_path)
    split_tune_shards(cfg.paths.shards, root / "holdout", cfg.tune.holdout_fraction, cfg.data.seed)
    holdout = holdout_fingerprint(holdout_ids(root / "holdout"))
    vocab = Vocabulary.load(cfg.paths.shards)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("test_resnet", len(vocab))
        path = root / f"member{seed}" / "best.pt"
        path.parent.mkdir()
        save_checkpoint(path, {"model": model.state_dict(), "model_name": "test_resnet", "classes": vocab.codes,
                               "class_counts": manifest["class_counts"]["train"], "config": cfg.to_dict(),
                               "decision_rule": DecisionRule(0.3, 1, 4).to_dict(), "holdout": holdout})
        paths.append(path)
    return cfg, paths, root


def make(cfg, paths, out, capsys, *extra):
    args = ["--config", str(cfg.source), "--out", str(out), *extra]
    for p in paths:
        args += ["--checkpoint", str(p)]
    return run_main(ensemble_main, args, capsys)


def test_the_ensemble_rule_is_chosen_on_the_combined_holdout_scores_as_tune_chooses(members, tmp_path, capsys):
    cfg, paths, root = members
    out = tmp_path / "sub" / "ENSEMBLE"
    code, _, err = make(cfg, paths, out, capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert [(out.parent / m["path"]).resolve() for m in doc["members"]] == [p.resolve() for p in paths]
    assert all(len(m["sha256"]) == 64 for m in doc["members"]) and doc["combination"] == {"method": "mean"}
    # the same rule, from each member predicted on its own and combined by hand
    fit, holdout = split_tune_shards(cfg.paths.shards, tmp_path / "h", cfg.tune.holdout_fraction, cfg.data.seed)
    tops, targets = [], None
    for p in paths:
        model = create_model("test_resnet", len(load_checkpoint(p)["classes"]))
        model.load_state_dict(load_checkpoint(p)["model"])
        loader = eval_loader(pipes(cfg), holdout, 3, tta=cfg.predict.tta)
        rows = list(predict_topk(model, loader, cfg.predict.top_k, to_input(cfg)))
        tops.append((torch.from_numpy(np.concatenate([r[0] for r in rows])),
                     torch.from_numpy(np.concatenate([r[1] for r in rows]))))
        targets = [np.flatnonzero(t).tolist() for r in rows for t in r[2][0].numpy()]
    classes = len(load_checkpoint(paths[0])["classes"])
    idx, sc = combine_topk(tops, classes, cfg.predict.top_k, Combination())
    seen = tuning_classes(cfg.paths.shards)  # the unseen-class threshold is chosen with the rest
    rule, f2 = choose_rule(idx.numpy(), sc.numpy(), targets, cfg.tune.min_class_examples, seen)
    assert doc["decision_rule"] == rule.to_dict() and doc["holdout_f2"] == pytest.approx(f2, abs=1e-5)
    assert doc["holdout"]["images"] == holdout.samples == len(targets)
    member_f2 = [choose_rule(i.numpy(), s.numpy(), targets, cfg.tune.min_class_examples, seen)[1] for i, s in tops]
    assert [m["holdout_f2"] for m in doc["members"]] == pytest.approx(member_f2, abs=1e-5)


def test_an_ensemble_chooses_its_test_resolution_on_the_originals_and_submit_uses_it(members, tmp_path, capsys,
                                                                                     monkeypatch):
    import inference.ensemble as ensemble_module
    import inference.submit as submit_module
    cfg, paths, _ = members
    passes = []
    real_loader = ensemble_module.ImageFileLoader

    def counting(*args, **kw):
        passes.append(kw["resolution"])
        return real_loader(*args, **kw)
    monkeypatch.setattr(ensemble_module, "ImageFileLoader", counting)
    out = tmp_path / "ENSEMBLE"
    code, _, err = make(cfg, paths, out, capsys, "--set", "tune.test_resolutions=[[64, 56], [80, 72]]")
    assert code == 0, err
    assert passes == [(64, 56), (80, 72)]  # one pass per candidate, every member at once
    rule = DecisionRule.from_dict(json.loads(out.read_text())["decision_rule"])
    assert rule.test_resolution in passes
    used = []
    real = submit_module.predict_files
    monkeypatch.setattr(submit_module, "predict_files", lambda *a, **kw: used.append(a[6]) or real(*a, **kw))
    submit_module.submit(cfg.with_overrides([f"paths.output={tmp_path / 'o'}"]), 2, out)
    assert used == [rule.test_resolution]


def test_a_vote_is_written_and_more_votes_than_members_is_one_line(members, tmp_path, capsys):
    cfg, paths, _ = members
    assert make(cfg, paths, tmp_path / "E", capsys, "--set", "predict.ensemble_vote=2")[0] == 0
    assert json.loads((tmp_path / "E").read_text())["combination"] == {"method": "vote", "k": 2}
    code, _, err = make(cfg, paths, tmp_path / "F", capsys, "--set", "predict.ensemble_vote=3")
    assert code == 2 and err.strip().startswith("error: predict.ensemble_vote=3 asks for at least 3 of 2")
    assert not (tmp_path / "F").exists()


def test_a_submission_predicts_every_member_from_one_pass(members, tmp_path, monkeypatch):
    cfg, paths, _ = members
    cfg = cfg.with_overrides([f"paths.output={tmp_path / 'out'}"])
    built_loaders = []
    real = predict_module.ImageFileLoader

    def counting(*args, **kw):
        built_loaders.append(kw.get("batch_size"))
        return real(*args, **kw)

    monkeypatch.setattr(predict_module, "ImageFileLoader", counting)
    files = sorted((cfg.paths.competition_data / "stage_2_test_images").glob("*.jpg"))
    models = []
    for p in paths:
        state = load_checkpoint(p)
        m = create_model("test_resnet", len(state["classes"]))
        m.load_state_dict(state["model"])
        models.append(m.eval())
    runtime = cpu_runtime(cfg)
    together = predict_files(models, files, runtime, pipes(cfg), cfg.predict, combination=Combination("vote", 2))
    assert len(built_loaders) == 1  # one DALI pass for both members
    alone = [predict_files(m, files, runtime, pipes(cfg), cfg.predict) for m in models]
    tops = [(torch.from_numpy(a.indices), torch.from_numpy(a.scores)) for a in alone]
    idx, sc = combine_topk(tops, len(load_checkpoint(paths[0])["classes"]), cfg.predict.top_k, Combination("vote", 2))
    assert np.array_equal(together.indices, idx.numpy()) and np.allclose(together.scores, sc.numpy(), atol=1e-6)


def test_submit_with_an_ensemble_uses_its_rule_and_keeps_fallbacks(members, tmp_path, capsys):
    cfg, paths, _ = members
    ens = tmp_path / "ENSEMBLE"
    assert make(cfg, paths, ens, capsys)[0] == 0
    comp = tmp_path / "inclusive"
    shutil.copytree(cfg.paths.competition_data, comp)
    images = sorted((comp / "stage_2_test_images").glob("*.jpg"))
    images[0].write_bytes(corrupt_huffman_table(jpeg_bytes(photo(np.random.default_rng(3)))))
    out = tmp_path / "out"
    code, _, err = run_main(submit_main, ["--config", str(cfg.source), "--stage", "2", "--checkpoint", str(ens),
                                          "--set", f"paths.competition_data={comp}", "--set", f"paths.output={out}",
                                          "--save-scores", str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    with open(out / "submission_stage2_problems.csv", newline="") as f:
        assert [r["image_id"] for r in csv.DictReader(f)] == [images[0].stem]
    saved = np.load(tmp_path / "s.npz")
    rule = DecisionRule.from_dict(json.loads(ens.read_text())["decision_rule"])
    codes = list(saved["classes"])
    chosen = rule.apply(saved["indices"][saved["predicted"]], saved["scores"][saved["predicted"]])
    with open(out / "submission_stage2.csv", newline="") as f:
        rows = {r["image_id"]: r["labels"] for r in csv.DictReader(f)}
    predicted_ids = saved["image_ids"][saved["predicted"]]
    assert [rows[i] for i in predicted_ids] == [" ".join(codes[c] for c in labels) for labels in chosen]


# ---- bad input: one line, exit 2, the earlier submission kept -----------------------------------------------

@pytest.fixture
def ensemble_copy(members, tmp_path, capsys):
    """A private copy of the members and an ENSEMBLE over them, and an earlier submission in the output folder."""
    cfg, paths, _ = members
    copies = []
    for i, p in enumerate(paths):
        copies.append(tmp_path / "m" / f"{i}.pt")
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(p, copies[-1])
    ens = tmp_path / "ENSEMBLE"
    assert make(cfg, copies, ens, capsys)[0] == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "submission_stage2.csv").write_text("an earlier submission\n")
    return cfg.with_overrides([f"paths.output={out}"]), copies, ens, out


def submit_fails(cfg, checkpoints, out, capsys, *extra) -> str:
    args = ["--config", str(cfg.source), "--stage", "2", "--set", f"paths.output={out}", *extra]
    for c in checkpoints:
        args += ["--checkpoint", str(c)]
    code, _, err = run_main(submit_main, args, capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert sorted(p.name for p in out.iterdir()) == ["submission_stage2.csv"]
    assert (out / "submission_stage2.csv").read_text() == "an earlier submission\n"
    return lines[0]


def test_a_missing_member_is_one_line(ensemble_copy, capsys):
    cfg, copies, ens, out = ensemble_copy
    copies[1].unlink()
    line = submit_fails(cfg, [ens], out, capsys)
    assert f"ensemble member {copies[1]} (named by {ens}) not found" in line


def test_a_member_that_is_not_a_checkpoint_is_one_line(ensemble_copy, capsys):
    cfg, copies, ens, out = ensemble_copy
    copies[0].write_text("not a checkpoint\n")
    assert "not a checkpoint of this project" in submit_fails(cfg, [ens], out, capsys)


def test_a_member_changed_since_the_ensemble_was_made_is_one_line(ensemble_copy, capsys):
    cfg, copies, ens, out = ensemble_copy
    state = load_checkpoint(copies[1])
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(copies[1], state)  # retrained in place: still a checkpoint, another model
    line = submit_fails(cfg, [ens], out, capsys)
    assert f"ensemble member {copies[1]} has changed since the ensemble was made" in line


def test_members_with_different_class_lists_are_one_line(ensemble_copy, tmp_path, capsys):
    cfg, copies, ens, out = ensemble_copy
    state = load_checkpoint(copies[1])
    state["classes"] = list(reversed(state["classes"]))
    save_checkpoint(copies[1], state)
    line = submit_fails(cfg, copies, out, capsys)
    assert "were trained on different class lists" in line and "in another order" in line
    code, _, err = make(cfg, copies, tmp_path / "E2", capsys)
    assert code == 2 and "different class lists" in err and not (tmp_path / "E2").exists()


def test_a_member_trained_on_other_crops_is_refused_in_one_line(ensemble_copy, capsys):
    cfg, copies, ens, out = ensemble_copy
    state = load_checkpoint(copies[1])
    state["config"]["pipeline"]["crop_size"] += 8
    save_checkpoint(copies[1], state)
    line = submit_fails(cfg, copies, out, capsys)
    assert "were trained on different input (pipeline.crop_size=" in line


def test_an_ensemble_chosen_on_another_holdout_is_one_line(ensemble_copy, tmp_path, capsys):
    cfg, copies, ens, out = ensemble_copy
    doc = json.loads(ens.read_text())
    doc["holdout"]["sha256"] = "0" * 64
    ens.write_text(json.dumps(doc))
    assert "is not the hold-out" in submit_fails(cfg, [ens], out, capsys)
    # and when it is made: a config whose hold-out is not the one the members were tuned with
    code, _, err = make(cfg, copies, tmp_path / "E3", capsys, "--set", "tune.holdout_fraction=0.5")
    assert code == 2 and "this config's tune hold-out" in err and "is not the hold-out" in err
    assert not (tmp_path / "E3").exists()


@pytest.mark.parametrize("text", ['{"format": "iic-ensemble/1"}', "{not json", '{"format": "other"}'])
def test_a_damaged_ensemble_file_is_one_line(ensemble_copy, text, capsys):
    cfg, copies, ens, out = ensemble_copy
    ens.write_text(text)
    assert f"{ens} is not an ensemble file made by python -m inference.ensemble" in submit_fails(cfg, [ens], out,
                                                                                                 capsys)


def test_an_ensemble_file_goes_alone(ensemble_copy, capsys):
    cfg, copies, ens, out = ensemble_copy
    assert "pass it as the only --checkpoint" in submit_fails(cfg, [ens, copies[0]], out, capsys)


def test_several_checkpoints_mix_with_the_configs_rule(members, tmp_path):
    cfg, paths, _ = members
    cfg = cfg.with_overrides([f"paths.output={tmp_path / 'out'}"])
    summary = submit(cfg, 2, paths)
    assert summary["members"] == 2 and summary["predicted"] > 0


def test_the_same_member_twice_is_one_line(members, tmp_path, capsys):
    cfg, paths, _ = members
    shutil.copy(paths[0], tmp_path / "copy.pt")
    code, _, err = make(cfg, [paths[0], tmp_path / "copy.pt"], tmp_path / "E", capsys)
    assert code == 2 and "are the same model" in err and not (tmp_path / "E").exists()


def test_a_vote_setting_beside_an_ensemble_file_is_named_as_not_applying(ensemble_copy, caplog):
    cfg, copies, ens, out = ensemble_copy
    summary = submit(cfg.with_overrides(["predict.ensemble_vote=2"]), 2, [ens])
    assert summary["members"] == 2
    assert any("predict.ensemble_vote=2 does not apply" in r.getMessage() for r in caplog.records)


def test_members_keep_what_inference_needs_and_not_the_optimiser(members, tmp_path):
    from model.members import load_members
    cfg, paths, _ = members
    resumable = tmp_path / "last.pt"
    state = load_checkpoint(paths[0])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    save_checkpoint(resumable, {**state, "optimizer": opt.state_dict(), "scaler": {}, "dali": [b"x"], "rng": {},
                                "epoch_progress": {"step": 3}})
    kept = load_members([resumable, paths[1]])[0].state
    assert not {"optimizer", "scaler", "dali", "rng", "epoch_progress"} & set(kept)
    assert {"model", "classes", "class_counts", "decision_rule", "config", "holdout"} <= set(kept)
