import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.config import load_config
from benchmarks.gpu_check import validation_from_checkpoint
from common.errors import UserError
from common.device import resolve_device
from model.checkpoint import load_checkpoint
from training.train import TrainingDiverged, main as train_main, train
from preprocessing.verify import main as verify_main
from tests.fixtures import REPO, SMALL_SHARDS, break_image_in_place, run_main, shard_samples, write_config

# small and quick: the demo config (timm test_resnet on 56-px crops), a few steps per epoch; the
# learning rate steps after epoch 2 and dropout draws random numbers every step, so that a resume
# that forgot the scheduler or the random state would end with other weights
FAST = """model:
  drop_rate: 0.3
train:
  epochs: 3
  batch_size: 8
  log_every: 1
  lr_step_epochs: 2
tune:
  epochs: 2
  batch_size: 4
  holdout_fraction: 0.4
"""


def run_module(args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def trained(built, kaggle, tmp_path_factory):
    """A clean 3-epoch train run in its own process, then a 2-epoch tune run."""
    cfg, _ = built
    root = tmp_path_factory.mktemp("trained")
    cfg_path = write_config(root / "c.yaml", kaggle[0], cfg.paths.shards, FAST, artifacts=root / "artifacts")
    for stage in ("train", "tune"):
        r = run_module(["training.train", "--config", str(cfg_path), "--stage", stage])
        assert r.returncode == 0, r.stderr[-3000:]
    return cfg_path, root / "artifacts"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_short_run_lowers_the_loss_and_writes_every_artefact(trained):
    _, artifacts = trained
    out = artifacts / "train"
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    rows = records(out / "metrics.jsonl")
    steps = [r["loss"] for r in rows if "val_gap" not in r]
    epochs = [r for r in rows if "val_gap" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert sum(steps[-5:]) / 5 < sum(steps[:5]) / 5
    for key in ("lr", "images_per_s", "data_wait_share", "val_gap", "val_f2", "val_threshold"):
        assert key in epochs[-1]
    assert 0 <= epochs[-1]["data_wait_share"] < 1
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["model_name"] == "test_resnet" and len(state["classes"]) == 22


def test_the_tune_stage_picks_best_by_gap_and_saves_a_rule_with_its_honest_figure(trained):
    _, artifacts = trained
    best = load_checkpoint(artifacts / "tune" / "checkpoints" / "best.pt")
    rule = best["decision_rule"]
    assert 0 < rule["threshold"] < 1 and 1 <= rule["min_labels"] <= rule["max_labels"]
    rows = [r for r in records(artifacts / "tune" / "metrics.jsonl") if "val_gap" in r]
    assert len(rows) == 2 and all(r["val_images"] >= 4 for r in rows)
    # picked by the hold-out's GAP, which no rule enters, not by the F2 of a rule chosen on the same images
    assert best["metric"] == max(r["val_gap"] for r in rows) and "val_f2_rule" not in rows[0]
    report = json.loads((artifacts / "tune" / "report.json").read_text())
    assert report["best_epoch"] == best["epoch"] and report["rule"] == rule
    assert report["holdout_images"] == rows[0]["val_images"] == best["holdout"]["images"]
    assert 0 <= report["f2_cross_fitted"] <= 1 and 0 <= report["f2_in_sample"] <= 1


def test_every_record_has_its_wall_time(trained):
    _, artifacts = trained
    for stage in ("train", "tune"):
        times = [r["wall_time"] for r in records(artifacts / stage / "metrics.jsonl")]
        assert times == sorted(times) and abs(times[-1] - time.time()) < 3600


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_a_clean_run(trained, tmp_path):
    cfg_path, artifacts = trained
    cfg = load_config(cfg_path)
    killed_cfg = write_config(tmp_path / "c.yaml", type("L", (), {"original_images": cfg.paths.original_images,
                                                                   "competition_data": cfg.paths.competition_data}),
                              cfg.paths.shards, FAST, artifacts=tmp_path / "artifacts")
    last = tmp_path / "artifacts" / "train" / "checkpoints" / "last.pt"
    cmd = [sys.executable, "-m", "training.train", "--config", str(killed_cfg), "--stage", "train"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not last.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(last)["epoch"] == 1  # killed before the learning-rate step
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resuming train" in r.stdout, r.stderr[-2000:]
    resumed = load_checkpoint(last)["model"]
    clean = load_checkpoint(artifacts / "train" / "checkpoints" / "last.pt")["model"]
    assert resumed.keys() == clean.keys()
    for k in clean:
        assert torch.allclose(resumed[k].double(), clean[k].double(), atol=1e-5), k


@pytest.mark.slow
def test_two_processes_on_the_cpu_keep_identical_weights(built, kaggle, tmp_path):
    cfg, manifest = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, FAST.replace("epochs: 3", "epochs: 2"),
                            artifacts=tmp_path / "artifacts")
    # with a resolution schedule: every rank rebuilds its pipeline for the second epoch's side
    r = subprocess.run(["bash", "scripts/train.sh", "--nproc-per-node", "2", "--", "--config", str(cfg_path),
                        "--stage", "train", "--set",
                        "train.resolution={start: 40, end: 56, start_epoch: 0, end_epoch: 1, step: 16}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [x for x in records(tmp_path / "artifacts" / "train" / "metrics.jsonl") if "val_gap" in x]
    assert len(epochs) == 2 and [e["resolution"] for e in epochs] == [40, 56]
    # each rank validated its half with its own replica: equal to one process on the saved weights only when DDP
    # kept every rank's weights and BatchNorm statistics identical
    alone = validation_from_checkpoint(cfg_path, tmp_path / "artifacts" / "train" / "checkpoints" / "last.pt",
                                       resolve_device("cpu"))
    assert abs(epochs[-1]["val_gap"] - alone["val_gap"]) < 1e-6 and abs(epochs[-1]["val_f2"] - alone["val_f2"]) < 1e-6
    for e in epochs:
        assert e["samples_per_rank"][0] == e["samples_per_rank"][1] > 0
        assert sum(e["samples_per_rank"]) <= manifest["splits"]["train"]["samples"]
        assert e["val_images"] == manifest["splits"]["val"]["samples"]  # validation gathered from both ranks


def test_a_damaged_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    cfg_path, artifacts = trained
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((artifacts / "train" / "checkpoints" / "best.pt").read_bytes()[:5000])
    with pytest.raises(UserError, match="damaged or not a checkpoint"):
        load_checkpoint(damaged)
    with pytest.raises(SystemExit) as exit_:
        train_main(["--config", str(cfg_path), "--stage", "tune", "--init", str(damaged),
                    "--set", f"paths.artifacts={tmp_path / 'a'}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: checkpoint {damaged} is damaged")


def test_a_diverging_loss_stops_with_a_clear_message(built, kaggle, tmp_path):
    cfg, _ = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, FAST, artifacts=tmp_path / "a")
    with pytest.raises(TrainingDiverged, match=r"the loss is (nan|inf) at epoch 1, step \d+"):
        train(load_config(cfg_path, ["train.lr=1e12", "train.epochs=1"]), "train")
    assert not (tmp_path / "a" / "train" / "checkpoints" / "last.pt").exists()


def test_a_damaged_shard_stops_training_in_one_line_and_the_repaired_run_resumes(built, kaggle, tmp_path, capsys):
    cfg, manifest = built
    shards = tmp_path / "shards"
    shutil.copytree(cfg.paths.shards, shards)
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], shards, FAST + SMALL_SHARDS, artifacts=tmp_path / "a")
    args = ["--config", str(cfg_path), "--stage", "train", "--set", "train.epochs=1"]
    assert run_main(train_main, args, capsys)[0] == 0
    last = tmp_path / "a" / "train" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    tar = shards / next(s["name"] for s in manifest["shards"] if s["split"] == "train")
    key = break_image_in_place(tar)

    code, _, err = run_main(train_main, args[:-1] + ["train.epochs=2"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, (code, err[-3000:])
    assert errors[0].startswith(f"error: {tar}: sample {key} does not decode")
    assert f"python -m preprocessing.verify --config {cfg_path} --set train.epochs=2 --repair" in errors[0]
    assert last.read_bytes() == before  # the last good state is kept

    assert run_main(verify_main, ["--config", str(cfg_path), "--repair"], capsys)[0] == 0
    code, _, _ = run_main(train_main, args[:-1] + ["train.epochs=2"], capsys)
    assert code == 0 and load_checkpoint(last)["epoch"] == 2


MID_EPOCH = """model:
  drop_rate: 0.3
train:
  epochs: 2
  batch_size: 4
  log_every: 2
  lr_step_epochs: 1
  checkpoint_every_steps: 3
"""


def comparable(rows: list[dict]) -> list[tuple]:
    """metrics.jsonl without its timings."""
    return [(r["step"], r["loss"], r["lr"], r.get("val_gap")) for r in rows]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_exactly_the_weights_of_a_clean_run(built, kaggle, tmp_path):
    cfg, _ = built
    runs = {}
    for name in ("clean", "killed"):
        cfg_path = write_config(tmp_path / f"{name}.yaml", kaggle[0], cfg.paths.shards, MID_EPOCH,
                                artifacts=tmp_path / name)
        runs[name] = [sys.executable, "-m", "training.train", "--config", str(cfg_path), "--stage", "train"]
    r = subprocess.run(runs["clean"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = tmp_path / "killed" / "train" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(runs["killed"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not last.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(last)
    assert saved["epoch"] == 0 and saved["epoch_progress"]["step"] in (3, 6, 9)  # killed inside the first epoch
    r = subprocess.run(runs["killed"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resuming train" in r.stdout and ", step " in r.stdout, r.stderr[-2000:]
    clean = load_checkpoint(tmp_path / "clean" / "train" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(last)
    assert resumed["step"] == clean["step"] == 2 * 11
    for k in clean["model"]:
        assert torch.equal(resumed["model"][k], clean["model"][k]), k  # bitwise
    assert comparable(records(tmp_path / "killed" / "train" / "metrics.jsonl")) == \
        comparable(records(tmp_path / "clean" / "train" / "metrics.jsonl"))


def test_a_training_step_reads_nothing_back_from_the_device(built, kaggle, tmp_path, monkeypatch):
    """Host syncs (item, tolist, cpu, numpy, bool of a tensor) per extra step, 5- against 45-step epochs."""
    cfg, manifest = built
    assert manifest["splits"]["train"]["samples"] >= 45
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, **kw: (calls.append(1), _f(self, *a, **kw))[1])
    counts = {}
    for steps in (5, 45):
        cfg_path = write_config(tmp_path / f"c{steps}.yaml", kaggle[0], cfg.paths.shards, "",
                                artifacts=tmp_path / str(steps))
        calls.clear()
        # float32 out of DALI, as on a GPU (float16 there): the CPU's uint8 crops come with their flip flags,
        # which the loader reads on the host to mirror them (host data, no device to wait for)
        train(load_config(cfg_path, ["train.epochs=1", "train.batch_size=1", "pipeline.dtype=float32",
                                     f"train.max_steps_per_epoch={steps}"]), "train")
        counts[steps] = len(calls)
    assert (counts[45] - counts[5]) / 40 < 0.1, counts


def test_the_tune_stage_s_rule_knows_the_classes_of_the_tuning_labels(trained):
    from common.tune_split import tuning_classes
    cfg_path, artifacts = trained
    cfg = load_config(cfg_path)
    report = json.loads((artifacts / "tune" / "report.json").read_text())
    truth = {c for _, labels in shard_samples(cfg, "tune").values() for c in labels}
    assert report["tuning_label_classes"] == len(tuning_classes(cfg.paths.shards)) == len(truth) > 0


def test_the_tune_report_line_says_what_the_unseen_class_threshold_did():
    from model.decision import ChosenRule, DecisionRule
    from training.rule_choice import describe
    report = {"best_by": "val_gap", "best_epoch": 3, "holdout_gap": 0.5, "holdout_images": 40}
    # as choose_rule makes them: the classes only where an unseen-class threshold won; the report knows it was sought
    lines = [describe("tune", {**report, "tuning_label_classes": classes},
                      ChosenRule(DecisionRule(unseen_threshold=unseen, seen_classes=seen), 0.7, 0.6, 5))
             for classes, seen, unseen in ((2, (1, 2), 0.95), (2, (), None), (None, (), None))]
    assert "never show: above 0.95" in lines[0]
    assert "never show: the global threshold" in lines[1]
    assert "never show" not in lines[2]
    assert "F2 0.6000 expected on new images (cross-fitted over 5 folds), 0.7000 on the images that chose it" \
        in lines[0]


def test_a_torn_last_record_does_not_stop_a_resume(tmp_path, caplog):
    from training.train import MetricsLog
    good = [{"stage": "train", "epoch": 1, "step": s, "loss": 1.0} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + '{"stage": "train", "ep')
    with caplog.at_level("WARNING", logger="training.train"):
        metrics = MetricsLog(tmp_path, enabled=True, resumed_step=2)  # a kill mid-write, after the step-2 save
    metrics.write({"stage": "train", "epoch": 1, "step": 3, "loss": 0.5}, 3)
    metrics.close()
    rows = records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    assert "1 unreadable record(s) dropped" in caplog.text


RAMP = """model:
  drop_rate: 0.3
train:
  epochs: 3
  batch_size: 4
  log_every: 2
  checkpoint_every_steps: 3
  resolution: {start: 40, end: 56, start_epoch: 0, end_epoch: 2, step: 8}
"""


class Crash(Exception):
    pass


@pytest.mark.slow
def test_a_run_stopped_inside_an_epoch_after_a_size_change_resumes_to_exactly_the_clean_run(built, kaggle, tmp_path,
                                                                                          monkeypatch):
    """Crops of 40, 48, then 56 px; one run stops right after its first mid-epoch checkpoint of epoch 3 (its
    pipeline rebuilt twice from the one before's state), and is run again: bitwise the uninterrupted run's weights."""
    import training.train as loop
    from training import losses
    cfg, _ = built
    paths = {name: write_config(tmp_path / f"{name}.yaml", kaggle[0], cfg.paths.shards, RAMP, artifacts=tmp_path / name)
             for name in ("clean", "stopped", "one_side")}
    seen = {}

    def recording(run):
        def factory(floor):
            loss = losses.per_positive_softmax_loss
            return lambda logits, targets: (seen.setdefault(run, []).append(targets.clone()), loss(logits, targets))[1]
        return factory
    for run, changes in (("clean", []), ("one_side", ["train.resolution=null"])):
        monkeypatch.setitem(losses.LOSSES, "per_positive_softmax", recording(run))
        train(load_config(paths[run], changes), "train")
    monkeypatch.undo()
    # the schedule changes the pixels alone: each rebuilt pipeline goes on with the samples (and windows) the one
    # before would have read, so the targets come in the order a run at one side trains on
    assert len(seen["clean"]) == len(seen["one_side"]) and all(
        torch.equal(a, b) for a, b in zip(seen["clean"], seen["one_side"]))
    save = loop.CheckpointSaver.save

    def save_then_crash(self, state, loader, metric=None):
        saved = save(self, state, loader, metric)
        if state.epoch == 2 and state.progress.step:
            assert loader.size == 56
            raise Crash()
        return saved
    monkeypatch.setattr(loop.CheckpointSaver, "save", save_then_crash)
    with pytest.raises(Crash):
        train(load_config(paths["stopped"]), "train")
    monkeypatch.setattr(loop.CheckpointSaver, "save", save)
    train(load_config(paths["stopped"]), "train")
    clean, resumed = (load_checkpoint(tmp_path / name / "train" / "checkpoints" / "last.pt")
                      for name in ("clean", "stopped"))
    assert resumed["step"] == clean["step"]
    for k in clean["model"]:
        assert torch.equal(resumed["model"][k], clean["model"][k]), k
    sides = [r["resolution"] for r in records(tmp_path / "clean" / "train" / "metrics.jsonl") if "val_gap" in r]
    assert sides == [40, 48, 56]
    assert comparable(records(tmp_path / "stopped" / "train" / "metrics.jsonl")) == \
        comparable(records(tmp_path / "clean" / "train" / "metrics.jsonl"))


def test_a_compiled_model_makes_one_graph_per_crop_side_not_one_per_step(built, kaggle, tmp_path):
    import torch._dynamo
    graphs = []

    @torch._dynamo.register_backend(name="iic_counting")
    def counting(gm, example_inputs):
        graphs.append([tuple(x.shape) for x in example_inputs if hasattr(x, "shape")])
        return gm.forward
    cfg, _ = built
    path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, RAMP.replace("checkpoint_every_steps: 3",
                                                                                       "max_steps_per_epoch: 3"),
                        artifacts=tmp_path / "a")
    torch._dynamo.reset()
    train(load_config(path, ["model.compile=true", "model.compile_backend=iic_counting"]), "train")
    batches = [shape for shapes in graphs for shape in shapes if shape[:2] == (4, 3)]  # [batch 4, RGB, side, side]
    assert [shape[-1] for shape in batches] == [40, 48, 56] and len(graphs) == 3  # 9 steps, 3 sides: 3 graphs


@pytest.mark.parametrize("recorded", [True, False], ids=["graph-recorded", "older-checkpoint"])
def test_a_last_pt_of_another_train_graph_resumes_at_its_epoch_s_start_saying_so(built, kaggle, tmp_path, monkeypatch,
                                                                                 caplog, recorded):
    """Stopped mid-epoch with the CPU's uint8 graph, run again with float32 out of DALI (another graph: DALI
    restores by operator name): the epoch starts again, with a warning saying what is repeated, not a damaged
    shard. Checkpoints from before they named their graph are recognised by DALI's own words."""
    import training.train as loop
    cfg, _ = built
    path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, MID_EPOCH, artifacts=tmp_path / "a")
    save = loop.CheckpointSaver.save

    def save_then_crash(self, state, loader, metric=None):
        saved = save(self, state, loader, metric)
        if state.progress.step:
            raise Crash()
        return saved
    monkeypatch.setattr(loop.CheckpointSaver, "save", save_then_crash)
    with pytest.raises(Crash):
        train(load_config(path), "train")
    monkeypatch.setattr(loop.CheckpointSaver, "save", save)
    last = tmp_path / "a" / "train" / "checkpoints" / "last.pt"
    stopped = load_checkpoint(last)
    assert stopped["epoch_progress"]["step"] == 3 and "uint8 crops" in stopped["dali_graph"]
    if not recorded:
        del stopped["dali_graph"]
        torch.save(stopped, last)
    with caplog.at_level("WARNING", logger="training.train"):
        train(load_config(path, ["pipeline.dtype=float32"]), "train")
    warning = "holds the state of another train graph" + (" (cpu graph, uint8 crops" if recorded else " (DALI: ")
    assert warning in caplog.text and "epoch 1 starts again from its beginning (its first 3 steps" in caplog.text
    finished = load_checkpoint(last)
    assert finished["epoch"] == 2 and finished["step"] == 2 * 11 and "float32 crops" in finished["dali_graph"]
