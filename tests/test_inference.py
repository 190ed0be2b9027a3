import csv
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import fbeta_score
from sklearn.preprocessing import MultiLabelBinarizer

from common.config import load_config
from common.vocab import Vocabulary
from inference.file_predictions import predict_files
from inference.score import read_labels, score
from inference.submit import main as submit_main, submit
from tests.fixtures import REPO, centre_crop_reference, corrupt_huffman_table, jpeg_bytes, photo, run_main, write_config, cpu_runtime, pipes
from model.checkpoint import save_checkpoint
from model.decision import DecisionRule
from model.metrics import topk_rescore
from model.network import create_model

BAD = {"missing00000000000000000": "missing file", "corrupt00000000000000000": "cannot decode",
       "truncated000000000000000": "truncated", "../../etc/passwd": "bad id"}


@pytest.fixture(scope="module")
def setup(built, kaggle, tmp_path_factory):
    """A competition folder with stage-2 images plus broken ones, a random-weight checkpoint, a config."""
    cfg, manifest = built
    layout = kaggle[0]
    root = tmp_path_factory.mktemp("infer")
    comp = root / "inclusive"
    shutil.copytree(layout.competition_data / "stage_2_test_images", comp / "stage_2_test_images")
    with open(layout.competition_data / "stage_2_sample_submission.csv") as f:
        rows = list(csv.reader(f))
    good = jpeg_bytes(photo(np.random.default_rng(0)))
    (comp / "stage_2_test_images" / "corrupt00000000000000000.jpg").write_bytes(corrupt_huffman_table(good))
    (comp / "stage_2_test_images" / "truncated000000000000000.jpg").write_bytes(good[: len(good) // 2])
    for k, image_id in enumerate(BAD):  # spread among the good rows
        rows.insert(3 + 4 * k, [image_id, rows[1][1]])
    with open(comp / "stage_2_sample_submission.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    vocab = Vocabulary.load(cfg.paths.shards)
    torch.manual_seed(0)
    model = create_model("test_resnet", len(vocab))
    ckpt = root / "model.pt"
    counts = manifest["class_counts"]["train"]
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_name": "test_resnet", "classes": vocab.codes,
                           "class_counts": counts, "decision_rule": DecisionRule(0.3, 2, 4).to_dict()})
    cfg_path = write_config(root / "c.yaml", type("L", (), {"original_images": layout.original_images,
                                                           "competition_data": comp}),
                            cfg.paths.shards, "predict:\n  tta: flip\n  batch_size: 8\nsubmit:\n  max_fallback_fraction: 0.2\n", output=root / "out")
    return load_config(cfg_path), ckpt, [r[0] for r in rows[1:]], vocab, counts


def test_submission_has_every_row_in_order_and_fallbacks_for_bad_images(setup, tmp_path):
    cfg, ckpt, ids, vocab, counts = setup
    summary = submit(cfg, 2, ckpt, save_scores=tmp_path / "s.npz")
    with open(cfg.paths.output / "submission_stage2.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "labels"]
    assert [r[0] for r in rows[1:]] == ids
    fallback = [vocab.codes[c] for c in np.argsort(-np.asarray(counts), kind="stable")[:2]]
    with open(cfg.paths.output / "submission_stage2_problems.csv", newline="") as f:
        problems = {r["image_id"]: r["reason"] for r in csv.DictReader(f)}
    assert problems == BAD
    for image_id, labels in rows[1:]:
        codes = labels.split()
        assert codes, "an empty row scores 0"
        assert all(c in vocab.index for c in codes) and len(codes) == len(set(codes))
        if image_id in BAD:
            assert codes == fallback
        else:
            assert 2 <= len(codes) <= 4  # the checkpoint's rule
    assert summary["predicted"] == len(ids) - len(BAD) and summary["fallback"] == len(BAD)
    saved = np.load(tmp_path / "s.npz")
    assert list(saved["image_ids"]) == ids and saved["scores"].shape == (len(ids), cfg.predict.top_k)
    assert saved["predicted"].sum() == len(ids) - len(BAD)


def test_a_batch_that_fails_inside_dali_costs_only_the_bad_image(setup, monkeypatch):
    """With the screening switched off, the corrupt file reaches DALI; its batch is retried one by one."""
    cfg, ckpt, ids, vocab, _ = setup
    folder = cfg.paths.competition_data / "stage_2_test_images"
    files = sorted(folder.glob("*.jpg"))
    files.remove(folder / "truncated000000000000000.jpg")  # libjpeg may decode a truncated file partially
    model = create_model("test_resnet", len(vocab)).eval()
    cfg = cfg.with_overrides(["predict.tta=none"])
    pred = predict_files(model, files, cpu_runtime(cfg), pipes(cfg), cfg.predict)
    bad = files.index(folder / "corrupt00000000000000000.jpg")
    assert pred.failed == {bad: "cannot decode (DALI)"}
    assert (pred.indices[[i for i in range(len(files)) if i != bad], 0] >= 0).all()


def test_dali_predictions_equal_a_pil_torchvision_reference(setup):
    """Same model, same images: every input the model is given is the reference's window (no other
    window 1 or 2 pixels away is closer), and rescored top-5 scores agree within 0.01."""
    cfg, _, _, vocab, _ = setup
    cfg = cfg.with_overrides(["predict.tta=none", "predict.top_k=5"])
    files = sorted((cfg.paths.competition_data / "stage_2_test_images").glob("[0-9a-f]*.jpg"))[:10]
    torch.manual_seed(1)
    model = create_model("test_resnet", len(vocab)).eval()
    inputs = []
    hook = model.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
    pred = predict_files(model, files, cpu_runtime(cfg), pipes(cfg), cfg.predict)
    hook.remove()
    inputs = torch.cat(inputs)
    assert len(inputs) == len(files)
    for given, f in zip(inputs, files):
        image = Image.open(f).convert("RGB")
        diffs = {(dy, dx): (given - centre_crop_reference(cfg, image, dy, dx)).abs().mean().item()
                 for dy in range(-2, 3) for dx in range(-2, 3)}
        assert min(diffs, key=diffs.get) == (0, 0) and diffs[(0, 0)] < 0.03, f.name
    with torch.no_grad():
        batch = torch.stack([centre_crop_reference(cfg, Image.open(f).convert("RGB")) for f in files])
        idx, sc = topk_rescore(model(batch), 5)
    assert (idx[:, 0].numpy() == pred.indices[:, 0]).mean() >= 0.9
    assert np.abs(pred.scores - sc.numpy()).max() < 0.01


def test_scorer_equals_scikit_learn_in_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    codes = [f"/m/0x{i}" for i in range(12)]
    ids = [f"{i:024x}" for i in range(40)]
    truth = {i: list(rng.choice(codes, rng.integers(1, 4), replace=False)) for i in ids}
    guess = {i: list(rng.choice(codes, rng.integers(0, 5), replace=False)) for i in ids[:35]}  # 5 missing
    guess["ffffffffffffffffffffffff"] = [codes[0]]  # unknown id
    for i in ids[:3]:  # a label repeated within a row counts once
        guess[i] = [truth[i][0], truth[i][0], codes[11], codes[11]]
    with open(tmp_path / "sub.csv", "w") as f:
        f.write("image_id,labels\n" + "".join(f"{i},{' '.join(c)}\n" for i, c in guess.items()))
    with open(tmp_path / "truth.csv", "w") as f:  # tuning_labels.csv layout: no header
        f.write("".join(f"{i},{' '.join(c)}\n" for i, c in truth.items()))
    mlb = MultiLabelBinarizer(classes=codes)
    expected = fbeta_score(mlb.fit_transform([truth[i] for i in ids]),
                           mlb.transform([guess.get(i, []) for i in ids]), beta=2, average="samples", zero_division=0)
    value, missing, unknown = score(read_labels(tmp_path / "sub.csv"), read_labels(tmp_path / "truth.csv"))
    assert abs(value - expected) < 1e-12 and missing == 5 and unknown == ["ffffffffffffffffffffffff"]
    r = subprocess.run([sys.executable, "-m", "inference.score", str(tmp_path / "sub.csv"), str(tmp_path / "truth.csv")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"mean F2: {expected:.5f}"
    assert "5 images of the solution are not in the submission" in r.stderr


def test_submit_without_a_checkpoint_is_a_clear_error(setup, tmp_path, capsys):
    cfg, *_ = setup
    with pytest.raises(SystemExit) as exit_:
        submit_main(["--config", str(cfg.source), "--stage", "2", "--set", f"paths.artifacts={tmp_path}"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().startswith("error: no checkpoint in")


def test_a_model_error_fails_the_run_and_keeps_the_previous_submission(setup, capsys):
    """float16 batches into a float32 model on the CPU: not a decode failure of every image."""
    cfg, ckpt, *_ = setup
    args = ["--config", str(cfg.source), "--stage", "2", "--checkpoint", str(ckpt)]
    assert run_main(submit_main, args, capsys)[0] == 0
    # an earlier run's problems file unlike the one this run would write: written too early, it would change
    (cfg.paths.output / "submission_stage2_problems.csv").write_text("image_id,reason\nearlier,run\n")
    before = {p.name: p.read_bytes() for p in cfg.paths.output.iterdir()}
    code, _, err = run_main(submit_main, args + ["--set", "pipeline.dtype=float16"], capsys)
    assert code != 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the batches do not suit the model")
    assert "pipeline.dtype" in errors[0]
    assert {p.name: p.read_bytes() for p in cfg.paths.output.iterdir()} == before


def test_a_mostly_missing_image_folder_is_refused(setup, tmp_path, capsys):
    cfg, ckpt, ids, *_ = setup
    comp = tmp_path / "inclusive"
    shutil.copytree(cfg.paths.competition_data, comp)
    for image in sorted((comp / "stage_2_test_images").glob("*.jpg"))[3:]:  # a half-unzipped folder
        image.unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "submission_stage2.csv").write_text("an earlier submission\n")
    code, _, err = run_main(submit_main, ["--config", str(cfg.source), "--stage", "2", "--checkpoint", str(ckpt),
                            "--set", f"paths.competition_data={comp}", "--set", f"paths.output={out}"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    refused = re.match(rf"error: (\d+) of {len(ids)} images cannot be predicted \(more than ", line)
    assert refused and int(refused.group(1)) >= len(ids) - 3 and "missing file" in line
    assert (out / "submission_stage2.csv").read_text() == "an earlier submission\n"
    assert sorted(p.name for p in out.iterdir()) == ["submission_stage2.csv"]


def test_exactly_the_damaged_and_missing_images_fall_back(setup, tmp_path):
    cfg, ckpt, *_ = setup
    comp = tmp_path / "inclusive"
    shutil.copytree(cfg.paths.competition_data, comp)
    for bad in ("corrupt", "truncated"):  # only the three below are broken
        (comp / "stage_2_test_images" / f"{bad}000000000000000{'00' if bad == 'corrupt' else ''}.jpg").unlink()
    images = sorted((comp / "stage_2_test_images").glob("*.jpg"))
    good = jpeg_bytes(photo(np.random.default_rng(5)))
    images[0].write_bytes(corrupt_huffman_table(good))
    images[1].write_bytes(good[: len(good) // 3])
    images[2].unlink()
    broken = {images[0].stem: "cannot decode", images[1].stem: "truncated", images[2].stem: "missing file"}
    rows = [["image_id", "labels"]] + [[p.stem, ""] for p in images]
    with open(comp / "stage_2_sample_submission.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    cfg = cfg.with_overrides([f"paths.competition_data={comp}", f"paths.output={tmp_path / 'out'}"])
    summary = submit(cfg, 2, ckpt)
    with open(tmp_path / "out" / "submission_stage2_problems.csv", newline="") as f:
        assert {r["image_id"]: r["reason"] for r in csv.DictReader(f)} == broken
    assert summary["fallback"] == 3 and summary["predicted"] == len(images) - 3


@pytest.mark.parametrize("make", [
    lambda p: p.write_text("not a checkpoint\n"),
    lambda p: p.write_text("hello\n"),  # torch.load's reason: KeyError(101), the byte 'e'
    lambda p: p.write_bytes(b""),
    lambda p: torch.save(torch.zeros(3), p),
    lambda p: torch.save({"model": {}}, p),
    lambda p: shutil.copy(REPO / "docs" / "benchmark_cpu.png", p),
])
def test_a_file_that_is_not_a_checkpoint_is_one_line(setup, tmp_path, capsys, make):
    cfg, *_ = setup
    make(tmp_path / "x.pt")
    code, _, err = run_main(submit_main, ["--config", str(cfg.source), "--stage", "2", "--checkpoint", str(tmp_path / "x.pt")],
                           capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]]
    assert err.startswith(f"error: checkpoint {tmp_path / 'x.pt'} ") and "checkpoint of this project" in err
    assert not re.search(r"\(\d+\)", err)  # never a bare number (a text file's KeyError) as the reason
    assert "set to `False`" not in err  # nor torch's advice to load it with weights_only=False
