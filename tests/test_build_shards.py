import csv
import os
import shutil
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image
import io

from common.config import load_config
from common.errors import UserError
from preprocessing.build_shards import RECORDS, build_shards
from preprocessing.resize import prepare_image
from common.shard_format import ShardWriter, encode_sample, file_sha256, iter_samples
from preprocessing.verify import main as verify_main, verify
from tests.fixtures import REPO, SMALL_SHARDS, corrupt_huffman_table, jpeg_bytes, photo, run_main, write_config


def read_shards(folder: Path, split: str | None = None) -> dict[str, dict]:
    """key -> sample, read with the webdataset library."""
    out = {}
    pattern = f"{split}-*.tar" if split else "*-[0-9]*.tar"
    for tar in sorted(folder.glob(pattern)):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            assert sample["__key__"] not in out, "a sample appears twice"
            out[sample["__key__"]] = {**sample, "split": tar.name.split("-")[0]}
    return out


def labeled_ids(comp: Path) -> dict[str, set]:
    """What a careful reader of the CSVs finds: every labeled id and its trainable positives."""
    trainable = set(pd.read_csv(comp / "classes-trainable.csv")["label_code"])
    rows = pd.read_csv(comp / "train_human_labels.csv", dtype=str, on_bad_lines="skip")
    out: dict[str, set] = {}
    for r in rows.itertuples():
        out.setdefault(("train", r.ImageID), set())
        if r.Confidence == "1" and r.LabelName in trainable:
            out[("train", r.ImageID)].add(r.LabelName)
    with open(comp / "tuning_labels.csv") as f:
        for image_id, codes in csv.reader(f):
            out[("tune", image_id)] = set(codes.split()) & trainable
    return out


def test_every_labeled_image_is_in_one_shard_or_one_skip_row(built, kaggle):
    cfg, manifest = built
    layout, expected = kaggle
    samples = read_shards(cfg.paths.shards)
    skipped = pd.read_csv(cfg.paths.shards / "skipped.csv", dtype=str, keep_default_na=False)
    assert not skipped.duplicated(["image_id", "split"]).any()
    packed = {("tune" if s["split"] == "tune" else "train", k) for k, s in samples.items()}
    skip_keys = {(r.split, r.image_id) for r in skipped.itertuples()}
    truth = labeled_ids(layout.competition_data)
    assert packed.isdisjoint(skip_keys)
    assert packed | skip_keys == set(truth)
    for r in skipped.itertuples():
        assert expected[(r.image_id, r.split)] == r.reason
    assert set(expected) == {(r.image_id, r.split) for r in skipped.itertuples()}
    assert manifest["skipped"] == skipped["reason"].value_counts().sort_index().to_dict()


def test_samples_hold_the_trainable_positive_labels(built, kaggle):
    cfg, manifest = built
    truth = labeled_ids(kaggle[0].competition_data)
    codes = pd.read_csv(cfg.paths.shards / "classes.csv")["label_code"].tolist()
    assert codes == pd.read_csv(kaggle[0].competition_data / "classes-trainable.csv")["label_code"].tolist()
    for key, s in read_shards(cfg.paths.shards).items():
        classes = np.frombuffer(s["labels"], dtype="<i4")
        meta = json.loads(s["json"])
        family = "tune" if s["split"] == "tune" else "train"
        assert {codes[c] for c in classes} == truth[(family, key)] == set(meta["labels"])
        assert list(classes) == sorted(classes) and meta["image_id"] == key
        im = Image.open(io.BytesIO(s["jpg"]))
        im.load()
        assert im.mode == "RGB" and min(im.size) == cfg.data.shortest_side


def test_splits_limits_and_manifest(built):
    cfg, manifest = built
    shards = cfg.paths.shards
    n_train_family = manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"]
    assert manifest["splits"]["val"]["samples"] >= 1
    for s in manifest["shards"]:
        path = shards / s["name"]
        assert s["samples"] <= 7
        assert path.stat().st_size == s["bytes"] and (shards / s["index"]).is_file()
        assert int((shards / s["index"]).read_text().split()[1]) == s["samples"]
    assert sum(s["samples"] for s in manifest["shards"]) == n_train_family + manifest["splits"]["tune"]["samples"]
    assert manifest["labels"]["train"]["malformed_rows"][0]["reason"].startswith("expected 4 fields")
    assert manifest["images"]["packed_as_is"] >= 1
    counts = manifest["class_counts"]["train"]
    train_labels = [c for k, smp in read_shards(shards, "train").items()
                    for c in np.frombuffer(smp["labels"], "<i4")]
    assert len(counts) == 22 and sum(counts) >= len(train_labels)  # planned images, skipped ones included
    assert all(counts[c] >= 1 for c in set(train_labels))
    assert not list(shards.glob(".*"))  # no temporaries, no resume state left behind


def test_shards_are_cut_up_front_from_the_shuffled_order(built):
    """Shard k of a split holds the images at positions [7k, 7k + 7) of its order, less the skipped ones:
    the boundaries never depend on which worker finished first."""
    cfg, manifest = built
    for split in ("train", "val", "tune"):
        mine = [s for s in manifest["shards"] if s["split"] == split]
        for s in mine:
            number = int(s["name"].split("-")[1][:6])
            assert s["positions"] == [7 * number, min(7 * number + 7, s["positions"][1])]
            assert 1 <= s["samples"] <= s["positions"][1] - s["positions"][0] <= 7
        ends = [s["positions"][1] for s in mine]
        assert ends == sorted(ends)


def test_every_packed_sample_is_its_own_source_image_prepared(built, kaggle):
    """Each sample's JPEG is exactly prepare_image() of the file named by its id: no sample is ever
    attached to another image's pixels, whatever order the workers finish in."""
    cfg, _ = built
    layout = kaggle[0]
    folders = {"train": layout.original_images / "train", "val": layout.original_images / "train",
               "tune": layout.competition_data / "stage_1_test_images"}
    samples = read_shards(cfg.paths.shards)
    assert len(samples) > 40
    for key, s in samples.items():
        source = (folders[s["split"]] / f"{key}.jpg").read_bytes()
        expected, _ = prepare_image(source, cfg.data.shortest_side, cfg.data.jpeg_quality, cfg.data.reduced_decode)
        assert s["jpg"] == expected, key


@pytest.mark.parametrize("workers", [1, 4])
def test_output_is_byte_identical_whatever_the_worker_count(built, kaggle, tmp_path, workers):
    cfg2, _ = built  # built with 2 workers
    cfg1 = load_config(write_config(tmp_path / "c.yaml", kaggle[0], tmp_path / "s", SMALL_SHARDS))
    build_shards(cfg1, workers=workers)
    names = sorted(p.name for p in cfg2.paths.shards.iterdir())
    assert names == sorted(p.name for p in cfg1.paths.shards.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (cfg1.paths.shards / name).read_bytes() == (cfg2.paths.shards / name).read_bytes(), name
    m1, m2 = (json.loads((c.paths.shards / "manifest.json").read_text()) for c in (cfg1, cfg2))
    assert m1["shards"] == m2["shards"]


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_result(built, kaggle, tmp_path):
    clean_cfg, clean = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], tmp_path / "s", SMALL_SHARDS)
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "preprocessing.build_shards", "--config", str(cfg_path), "--workers", "1"]
    kills, finished_before = 0, {}
    for attempt in range(30):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = len(list((out / RECORDS).glob("*.json")))
        while proc.poll() is None:  # kill as soon as one more shard is finished
            if len(list((out / RECORDS).glob("*.json"))) > seen:
                break
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:  # (a build that finished first has removed its records)
            kills += 1
            for record in (out / RECORDS).glob("*.json"):  # finished shards must never be redone
                shard = json.loads(record.read_text())["shard"]
                if shard:
                    stat = (out / shard["name"]).stat()
                    finished_before.setdefault(shard["name"], (stat.st_ino, stat.st_mtime_ns))
            continue
        assert proc.returncode == 0
        break
    assert kills >= 2
    for name, stamp in finished_before.items():
        stat = (out / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == stamp, f"{name} was rewritten"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == clean["shards"]
    assert (out / "skipped.csv").read_bytes() == (clean_cfg.paths.shards / "skipped.csv").read_bytes()
    assert not (out / RECORDS).exists() and not list(out.glob(".*.tmp"))


def test_second_run_is_a_no_op_and_other_settings_need_restart(built, kaggle, tmp_path):
    cfg, manifest = built
    before = {p.name: p.stat().st_mtime_ns for p in cfg.paths.shards.iterdir()}
    assert build_shards(cfg, workers=1)["shards"] == manifest["shards"]
    assert before == {p.name: p.stat().st_mtime_ns for p in cfg.paths.shards.iterdir()}
    changed = cfg.with_overrides(["data.jpeg_quality=50"])
    with pytest.raises(UserError, match="--restart"):
        build_shards(changed, workers=1)


def test_verify_passes_clean_shards_and_catches_damage(built_copy):
    shards, manifest = built_copy
    assert verify(shards) == []
    first = shards / manifest["shards"][0]["name"]
    data = bytearray(first.read_bytes())
    data[2000] ^= 0xFF  # inside the first image
    first.write_bytes(bytes(data))
    (shards / manifest["shards"][1]["index"]).write_text("v1.2 0\n")
    problems = verify(shards)
    assert any("sha256" in p and first.name in p for p in problems)
    assert any(manifest["shards"][1]["index"] in p and "does not match" in p for p in problems)


def test_verify_command_exits_non_zero_on_a_problem(built_copy, kaggle, tmp_path, capsys):
    shards, manifest = built_copy
    (shards / manifest["shards"][-1]["name"]).unlink()
    cfg = write_config(tmp_path / "c.yaml", kaggle[0], shards)
    with pytest.raises(SystemExit) as exit_:
        verify_main(["--config", str(cfg)])
    assert exit_.value.code == 1
    assert f"{manifest['shards'][-1]['name']}: missing" in capsys.readouterr().out


def test_dali_reads_the_shards_with_their_indexes(built):
    from nvidia.dali import fn, pipeline_def, types

    cfg, manifest = built
    shards = cfg.paths.shards
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    total = sum(s["samples"] for s in train)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def read():
        jpg, labels, meta = fn.readers.webdataset(
            paths=[str(shards / s["name"]) for s in train], index_paths=[str(shards / s["index"]) for s in train],
            ext=["jpg", "labels", "json"], dtypes=[types.UINT8, types.INT32, types.UINT8], name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), labels, meta

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("reader") == total
    reference = read_shards(shards, "train")
    seen = {}
    while len(seen) < total:
        images, labels, metas = pipe.run()
        for k in range(len(images)):
            key = json.loads(bytes(np.array(metas.at(k))).decode())["image_id"]
            seen[key] = (np.array(images.at(k)), np.array(labels.at(k)))
    assert set(seen) == set(reference)
    for key, (image, labels) in seen.items():
        assert labels.tolist() == np.frombuffer(reference[key]["labels"], "<i4").tolist()
        pil = np.asarray(Image.open(io.BytesIO(reference[key]["jpg"])).convert("RGB")).astype(int)
        assert image.shape == pil.shape
        assert np.abs(image.astype(int) - pil).mean() < 2


def rewrite_shard(shards: Path, position: int, edit) -> tuple[str, dict]:
    """Repack one shard after ``edit(samples)`` and make its manifest record and index agree with it,
    so that verification can find only what ``edit`` broke. Returns the shard's name and the manifest."""
    manifest = json.loads((shards / "manifest.json").read_text())
    record = manifest["shards"][position]
    tar = shards / record["name"]
    samples = [{k: s[k] for k in ("__key__", "jpg", "labels", "json")}
               for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)]
    edit(samples)
    writer = ShardWriter(shards, record["split"], int(record["name"].split("-")[1][:6]))
    for s in samples:
        writer.add(s)
    record.update({k: v for k, v in writer.close().to_dict().items() if k in ("samples", "bytes", "sha256")})
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return record["name"], manifest


def break_image(samples):
    samples[1]["jpg"] = corrupt_huffman_table(samples[1]["jpg"])


def break_labels(samples):
    samples[0]["labels"] = np.array([1, 22], dtype="<i4").tobytes()  # 22 classes: 0..21


def test_verify_finds_an_image_that_does_not_decode(built_copy):
    shards, _ = built_copy
    name, _ = rewrite_shard(shards, 0, break_image)
    problems = verify(shards)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: sample") and "does not decode" in problems[0]


def test_verify_finds_a_class_index_out_of_range(built_copy):
    shards, _ = built_copy
    name, _ = rewrite_shard(shards, 1, break_labels)
    problems = verify(shards)
    assert len(problems) == 1 and name in problems[0] and "class index out of range 0..21" in problems[0]


def test_verify_finds_a_sample_count_that_differs_from_the_manifest(built_copy):
    shards, _ = built_copy
    _, manifest = rewrite_shard(shards, 2, lambda samples: None)
    assert verify(shards) == []  # repacked as is: consistent
    manifest["shards"][2]["samples"] += 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    n = manifest["shards"][2]["samples"]
    assert verify(shards) == [f"{manifest['shards'][2]['name']}: {n - 1} samples, manifest says {n}"]


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_repair_rebuilds_exactly_the_damaged_shards_and_indexes(built_copy, kaggle, tmp_path, capsys):
    shards, manifest = built_copy
    cfg = write_config(tmp_path / "c.yaml", kaggle[0], shards, SMALL_SHARDS)
    recorded = {s["name"]: s["sha256"] for s in manifest["shards"]}
    indexes = {s["index"]: (shards / s["index"]).read_bytes() for s in manifest["shards"]}
    tune = next(s for s in manifest["shards"] if s["split"] == "tune")
    flip_byte(shards / manifest["shards"][0]["name"], 3000)
    flip_byte(shards / tune["name"], 700)  # a tar header
    (shards / manifest["shards"][2]["index"]).unlink()
    untouched = {s["name"]: (shards / s["name"]).stat().st_mtime_ns for s in manifest["shards"][3:] if s != tune}

    code, out, _ = run_main(verify_main, ["--config", str(cfg), "--workers", "2"], capsys)
    assert code == 1 and f"{manifest['shards'][2]['index']}: index missing" in out
    code, out, err = run_main(verify_main, ["--config", str(cfg), "--workers", "2", "--repair"], capsys)
    assert code == 0, err
    assert "repaired 3 shard(s)" in out
    assert {s["name"]: file_sha256(shards / s["name"]) for s in manifest["shards"]} == recorded
    assert {name: (shards / name).read_bytes() for name in indexes} == indexes
    assert {n: (shards / n).stat().st_mtime_ns for n in untouched} == untouched  # nothing else rewritten
    assert verify(shards) == [] and not [p for p in shards.iterdir() if p.name.startswith(".")]


def test_repair_refuses_a_shard_whose_original_changed(kaggle, tmp_path, capsys):
    root = tmp_path / "kaggle"
    shutil.copytree(kaggle[0].original_images.parent, root)
    layout = type("L", (), {"original_images": root / kaggle[0].original_images.name,
                            "competition_data": root / kaggle[0].competition_data.name})
    cfg_path = write_config(tmp_path / "c.yaml", layout, tmp_path / "shards", SMALL_SHARDS)
    manifest = build_shards(load_config(cfg_path), workers=1)
    first, second = manifest["shards"][0], manifest["shards"][1]
    shards = tmp_path / "shards"
    changed = next(iter_samples(shards / first["name"]))[0]
    image = layout.original_images / "train" / f"{changed}.jpg"
    image.write_bytes(jpeg_bytes(photo(np.random.default_rng(9))))
    flip_byte(shards / first["name"], 3000)
    flip_byte(shards / second["name"], 3000)
    code, out, err = run_main(verify_main, ["--config", str(cfg_path), "--repair", "--workers", "1"], capsys)
    assert code == 1
    assert f"error: {first['name']}: cannot be rebuilt as recorded" in err
    assert file_sha256(shards / second["name"]) == second["sha256"]  # the other one was repaired
    image.unlink()  # gone altogether: the reason names the image
    code, _, err = run_main(verify_main, ["--config", str(cfg_path), "--repair", "--workers", "1"], capsys)
    assert code == 1 and f"error: {first['name']}: cannot be rebuilt as recorded: its image {changed} is now " \
                         f"'missing file'" in err


def test_shard_bytes_equal_what_webdataset_writes(tmp_path):
    """The writer uses tarfile itself (webdataset's import costs a torch import): same bytes as its TarWriter."""
    samples = [encode_sample(f"{k:016x}", bytes((k + i) % 256 for i in range(700)), [k, k + 1], [f"/m/0{k}"]) for k in range(5)]
    writer = ShardWriter(tmp_path, "x", 0)
    for s in samples:
        writer.add(s)
    ours = (tmp_path / writer.close().name).read_bytes()
    with open(tmp_path / "wds.tar", "wb") as f:
        tar = wds.TarWriter(f, user="", group="", mode=0o444, mtime=0, encoder=False)
        for s in samples:
            tar.write(s)
        tar.close()
    assert ours == (tmp_path / "wds.tar").read_bytes()


def test_a_killed_worker_fails_the_run_clearly_and_the_rerun_completes(built, kaggle, tmp_path):
    clean_cfg, clean = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], tmp_path / "s", SMALL_SHARDS)
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "preprocessing.build_shards", "--config", str(cfg_path), "--workers", "2"]
    # slow the workers down so that one can be caught mid-shard
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    (tmp_path / "sitecustomize.py").write_text(
        "import time, preprocessing.resize as m\n_p = m.prepare_image\n"
        "def slow(*a, **k):\n    time.sleep(0.05)\n    return _p(*a, **k)\nm.prepare_image = slow\n")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    workers = []
    deadline = time.time() + 60
    while not workers and time.time() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        workers = children.read_text().split() if children.exists() else []
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(int(workers[-1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0].startswith("error: a worker process died") and "run the same command again" in errors[0]
    for tar in out.glob("*.tar"):  # no short shard under a final name: each equals the clean build's
        assert tar.read_bytes() == (clean_cfg.paths.shards / tar.name).read_bytes(), tar.name
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["shards"] == clean["shards"]
    assert (out / "skipped.csv").read_bytes() == (clean_cfg.paths.shards / "skipped.csv").read_bytes()
