"""Faults the machine causes: a full disk, a read-only folder. One line, exit code 2, nothing lost,
and the same command run again completes with the result of a run that never failed."""
import errno
import json

import tarfile

import pytest
import torch

from common.config import load_config
from common.vocab import Vocabulary
from inference.submit import main as submit_main
from model.checkpoint import load_checkpoint, save_checkpoint
from model.network import create_model
from preprocessing.build_shards import main as build_main
from tests.fixtures import FAST_TRAIN, SMALL_SHARDS, resize, run_main, write_config
from training.train import main as train_main, train

FULL_DISK = "no space left on the device while writing {}"
AGAIN = "free space and run the same command again"


def one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def assert_same_build(shards, built) -> None:
    cfg, manifest = built
    rebuilt = json.loads((shards / "manifest.json").read_text())
    assert rebuilt["shards"] == manifest["shards"]
    assert (shards / "skipped.csv").read_bytes() == (cfg.paths.shards / "skipped.csv").read_bytes()


def test_a_full_disk_while_building_shards_on_a_real_tmpfs(built, kaggle, tmpfs, tmp_path, capsys):
    disk = tmpfs("200k")  # the built shards take about 450 KB
    cfg = write_config(tmp_path / "c.yaml", kaggle[0], disk / "shards", SMALL_SHARDS)
    code, _, err = run_main(build_main, ["--config", str(cfg), "--workers", "2"], capsys)
    line = one_error(err)
    assert code == 2 and line.startswith("error: " + FULL_DISK.format(disk / "shards")) and line.endswith(AGAIN)
    resize(disk, "8m")
    assert run_main(build_main, ["--config", str(cfg), "--workers", "2"], capsys)[0] == 0
    assert_same_build(disk / "shards", built)


def test_a_full_disk_while_building_shards_injected(built, kaggle, tmp_path, capsys, monkeypatch):
    """The same fault where no tmpfs can be mounted: the tar writer's 12th file meets a full disk."""
    addfile = tarfile.TarFile.addfile
    calls = []

    def full_after_eleven(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", full_after_eleven)
    cfg = write_config(tmp_path / "c.yaml", kaggle[0], tmp_path / "shards", SMALL_SHARDS)
    code, _, err = run_main(build_main, ["--config", str(cfg), "--workers", "1"], capsys)
    assert code == 2 and one_error(err).startswith("error: " + FULL_DISK.format(tmp_path / "shards" / "train-000000"))
    assert run_main(build_main, ["--config", str(cfg), "--workers", "1"], capsys)[0] == 0
    assert_same_build(tmp_path / "shards", built)


@pytest.fixture(scope="module")
def one_epoch(built, kaggle, tmp_path_factory):
    """The weights of an uninterrupted one-epoch run."""
    cfg, _ = built
    root = tmp_path_factory.mktemp("clean")
    cfg_path = write_config(root / "c.yaml", kaggle[0], cfg.paths.shards, FAST_TRAIN, artifacts=root / "a")
    train(load_config(cfg_path, ["train.epochs=1"]), "train")
    return load_checkpoint(root / "a" / "train" / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_full_disk_while_saving_a_checkpoint_on_a_real_tmpfs(built, kaggle, tmpfs, tmp_path, capsys, one_epoch):
    cfg, _ = built
    disk = tmpfs("1m")  # a test_resnet checkpoint with its optimiser state is about 3 MB
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, FAST_TRAIN, artifacts=disk)
    args = ["--config", str(cfg_path), "--stage", "train", "--set", "train.epochs=1"]
    code, _, err = run_main(train_main, args, capsys)
    last = disk / "train" / "checkpoints" / "last.pt"
    line = one_error(err)
    assert code == 2 and line.startswith("error: " + FULL_DISK.format(last)) and line.endswith(AGAIN)
    assert not last.exists() and not list(last.parent.glob(".*.tmp"))
    resize(disk, "32m")
    assert run_main(train_main, args, capsys)[0] == 0
    assert_same_weights(load_checkpoint(last)["model"], one_epoch)
    rows = [json.loads(line) for line in (disk / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "val_gap" not in r]
    assert steps == sorted(set(steps)) and sum("val_gap" in r for r in rows) == 1  # the failed run's are gone


def test_a_full_disk_while_saving_a_checkpoint_injected(built, kaggle, tmp_path, capsys, monkeypatch, one_epoch):
    cfg, _ = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, FAST_TRAIN, artifacts=tmp_path / "a")
    args = ["--config", str(cfg_path), "--stage", "train", "--set", "train.epochs=1"]
    save = torch.save

    def full(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, _, err = run_main(train_main, args, capsys)
    last = tmp_path / "a" / "train" / "checkpoints" / "last.pt"
    assert code == 2 and one_error(err).startswith("error: " + FULL_DISK.format(last))
    monkeypatch.setattr(torch, "save", save)
    assert run_main(train_main, args, capsys)[0] == 0
    assert_same_weights(load_checkpoint(last)["model"], one_epoch)


def test_a_read_only_output_folder_is_one_line(built, kaggle, tmpfs, tmp_path, capsys):
    cfg, _ = built
    out = tmpfs("1m", read_only=True)
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, "", output=out)
    vocab = Vocabulary.load(cfg.paths.shards)
    save_checkpoint(tmp_path / "m.pt", {"model": create_model("test_resnet", len(vocab)).state_dict(),
                                        "model_name": "test_resnet", "classes": vocab.codes})
    code, _, err = run_main(submit_main, ["--config", str(cfg_path), "--stage", "2", "--checkpoint",
                                          str(tmp_path / "m.pt"), "--set", "submit.max_fallback_fraction=1"], capsys)
    line = one_error(err)
    # found before any image is read: the folder named with its key
    assert code == 2 and line == f"error: paths.output {out} cannot be written: the file system is read-only"


CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


def fail_after(monkeypatch, owner, name, calls: int, error=CUDA_FAULT):
    """``owner.name`` raises RuntimeError(error) from its ``calls + 1``-th call on; returns the call counter."""
    real, seen = getattr(owner, name), []

    def failing(*args, **kw):
        seen.append(1)
        if len(seen) > calls:
            raise RuntimeError(error)
        return real(*args, **kw)
    monkeypatch.setattr(owner, name, failing)
    return seen


@pytest.mark.parametrize("where", ["dali", "loader_torch_work"])
def test_a_gpu_fault_while_training_reads_batches_is_named_for_what_it_is(built, kaggle, tmp_path, capsys,
                                                                           monkeypatch, one_epoch, where):
    """A CUDA error inside DALI's iterator, or in the torch work the loader does on each batch, is the run's
    fault: its own words, exit code 1, no repair advice for healthy shards, the last checkpoint untouched."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    import dali_pipes.loader as loader
    cfg, _ = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, FAST_TRAIN, artifacts=tmp_path / "a")
    args = ["--config", str(cfg_path), "--stage", "train"]
    assert run_main(train_main, args + ["--set", "train.epochs=1"], capsys)[0] == 0
    last = tmp_path / "a" / "train" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    owner, name = (DALIGenericIterator, "__next__") if where == "dali" else (loader, "multi_hot")
    fail_after(monkeypatch, owner, name, calls=2)
    code, _, err = run_main(train_main, args + ["--set", "train.epochs=2"], capsys)
    line = one_error(err)
    assert code == 1 and CUDA_FAULT in line and "not of the data" in line
    assert "verify" not in err and "damaged" not in err
    assert last.read_bytes() == before


def test_a_gpu_fault_while_a_submission_reads_a_batch_stops_it_without_retrying_image_by_image(
        built, kaggle, tmp_path, capsys, monkeypatch):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    import inference.file_predictions as predictions
    cfg, _ = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, "predict:\n  batch_size: 4\n",
                            output=tmp_path / "out")
    vocab = Vocabulary.load(cfg.paths.shards)
    save_checkpoint(tmp_path / "m.pt", {"model": create_model("test_resnet", len(vocab)).state_dict(),
                                        "model_name": "test_resnet", "classes": vocab.codes})
    args = ["--config", str(cfg_path), "--stage", "2", "--checkpoint", str(tmp_path / "m.pt")]
    assert run_main(submit_main, args, capsys)[0] == 0
    submission = tmp_path / "out" / "submission_stage2.csv"
    before = submission.read_bytes()
    loaders = fail_after(monkeypatch, predictions, "ImageFileLoader", calls=10 ** 6)  # counts only
    fail_after(monkeypatch, DALIGenericIterator, "__next__", calls=1)
    code, _, err = run_main(submit_main, args, capsys)
    line = one_error(err)
    assert code == 1 and CUDA_FAULT in line and "cannot be predicted" not in err
    assert len(loaders) == 1  # no pipeline rebuilt per image of the failed batch
    assert submission.read_bytes() == before
