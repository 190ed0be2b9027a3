import csv
import re
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from demo.data import class_codes, generate_demo_data
from tests.fixtures import REPO, write_config


def test_generator_writes_the_exact_kaggle_layout(tmp_path):
    layout = generate_demo_data(tmp_path, n_train=30, n_stage1=12, n_stage2=10, n_tune=8)
    comp = layout.competition_data
    trainable = pd.read_csv(comp / "classes-trainable.csv")
    assert list(trainable.columns) == ["label_code"] and len(trainable) == len(class_codes()) + 2
    descriptions = pd.read_csv(comp / "class-descriptions.csv")
    assert list(descriptions.columns) == ["label_code", "description"]
    assert set(trainable.label_code) < set(descriptions.label_code)
    labels = pd.read_csv(comp / "train_human_labels.csv", dtype=str)
    assert list(labels.columns) == ["ImageID", "Source", "LabelName", "Confidence"]
    assert set(labels.Confidence) == {"0", "1"}
    assert labels.ImageID.str.fullmatch(r"[0-9a-f]{16}").all() and labels.ImageID.nunique() == 30
    assert all((layout.original_images / "train" / f"{i}.jpg").is_file() for i in labels.ImageID.unique())
    with open(comp / "tuning_labels.csv") as f:
        tuning = list(csv.reader(f))
    assert len(tuning) == 8 and not tuning[0][0].startswith("image_id")  # no header
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) and 1 <= len(c.split()) <= 3 for i, c in tuning)
    for stage, n in ((1, 12), (2, 10)):
        sample = pd.read_csv(comp / f"stage_{stage}_sample_submission.csv")
        solution = pd.read_csv(comp / f"stage_{stage}_solution.csv")
        assert list(sample.columns) == list(solution.columns) == ["image_id", "labels"]
        assert list(sample.image_id) == list(solution.image_id) and len(sample) == n
        for i in sample.image_id:
            Image.open(comp / f"stage_{stage}_test_images" / f"{i}.jpg").verify()
    assert {i for i, _ in tuning} <= set(pd.read_csv(comp / "stage_1_solution.csv").image_id)


@pytest.mark.slow
def test_the_whole_path_end_to_end_through_the_commands(tmp_path):
    """data -> build_shards -> verify -> train -> tune -> submit -> score, the README's commands on a tiny set."""
    layout = generate_demo_data(tmp_path / "data", n_train=600, n_stage1=120, n_stage2=60, n_tune=100)
    cfg = write_config(tmp_path / "c.yaml", layout, tmp_path / "shards", """train:
  epochs: 6
  batch_size: 16
tune:
  epochs: 30
  batch_size: 16
""", artifacts=tmp_path / "artifacts", output=tmp_path / "out")

    def run(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{args}: {r.stderr[-3000:]}"
        return r.stdout

    run("preprocessing.build_shards", "--config", str(cfg))
    run("preprocessing.verify", "--config", str(cfg))
    run("training.train", "--config", str(cfg), "--stage", "train")
    run("training.train", "--config", str(cfg), "--stage", "tune")
    run("inference.submit", "--config", str(cfg), "--stage", "2", "--checkpoint",
        str(tmp_path / "artifacts" / "train" / "checkpoints" / "best.pt"))
    (tmp_path / "out" / "submission_stage2.csv").rename(tmp_path / "out" / "untuned.csv")
    run("inference.submit", "--config", str(cfg), "--stage", "2")

    def f2(submission):
        out = run("inference.score", str(submission), str(layout.competition_data / "stage_2_solution.csv"))
        return float(re.fullmatch(r"mean F2: ([0-9.]+)\n", out).group(1))

    untuned, tuned = f2(tmp_path / "out" / "untuned.csv"), f2(tmp_path / "out" / "submission_stage2.csv")
    print(f"untuned {untuned:.3f} tuned {tuned:.3f}")
    assert 0 < untuned < tuned <= 1  # the README's claim in miniature: tuning on the new domain helps
    rows = pd.read_csv(tmp_path / "out" / "submission_stage2.csv", keep_default_na=False)
    assert len(rows) == 60 and (rows.labels != "").all()
