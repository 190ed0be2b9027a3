"""What can be shown on a CPU of the GPU path: graphs that define, device and dtype choices, checkpoints
that travel between machines, the learning-rate schedule for many GPUs."""
from functools import partial

import pytest
import torch

from common.config import load_config
from common.errors import UserError
from common.shard_format import split_shards
from dali_pipes import device as device_module
from dali_pipes.device import PipeDevice, gpu_index, resolve_device
from dali_pipes.loader import output_dtype
from dali_pipes.pipelines import (Output, decode_only_pipeline, eval_pipeline, image_file_pipeline,
                                  train_pipeline)
from inference.submit import submit
from model.checkpoint import cuda_states_to_restore, load_checkpoint
from tests.fixtures import REPO, write_config
from training.train import Stage, lr_factor, train

GPU = dict(on_gpu=True, batch_size=4, num_threads=1, device_id=0)


def test_every_gpu_graph_defines_on_a_cpu_only_machine(built, tmp_path):
    """DALI checks operator names and arguments when a graph is defined (building it needs CUDA), so a
    wrong argument in the GPU path fails here rather than on the first GPU."""
    cfg, _ = built
    shards = split_shards(cfg.paths.shards, "train")
    files = [tmp_path / "a.jpg"]
    for channels_last in (False, True):
        out = Output(56, "float16", channels_last, (0.5,) * 3, (0.2,) * 3)
        for augmentation in ("crop_flip", "random_resized_crop"):
            train_pipeline(shards.tars, shards.indexes, out=out, augmentation=augmentation, initial_fill=16,
                           enable_checkpointing=True, **GPU)
        for resize in (None, 64):
            for tta in ("none", "flip", "tencrop"):
                eval_pipeline(shards.tars, shards.indexes, out=out, resize_shorter=resize, tta=tta, **GPU)
        image_file_pipeline(files, out=out, resize_shorter=64, tta="tencrop", **GPU)
    decode_only_pipeline(shards.tars, shards.indexes, **GPU)
    # the control: a misspelt argument is caught at definition
    with pytest.raises(KeyError, match="device_memory_paddin"):
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=2, num_threads=1, device_id=0)
        def misspelt():
            jpegs, _ = fn.readers.webdataset(paths=[str(shards.tars[0])], ext=["jpg", "labels"])
            return fn.decoders.image(jpegs, device="mixed", device_memory_paddin=1)
        misspelt()


def test_auto_output_dtype_follows_the_autocast_dtype():
    gpu, cpu = PipeDevice("gpu", 0), PipeDevice("cpu", None)
    assert output_dtype("auto", gpu, None) == "float32"  # an fp32 model (train.amp off) gets float32
    assert output_dtype("auto", gpu, torch.float16) == "float16"
    assert output_dtype("auto", gpu, torch.bfloat16) == "float16"  # autocast casts it; DALI has no bfloat16
    assert output_dtype("auto", cpu, None) == "uint8"
    assert output_dtype("float32", gpu, torch.float16) == "float32"  # an explicit choice stands
    with pytest.raises(RuntimeError):  # why it matters: float16 batches into an fp32 model
        torch.nn.Conv2d(3, 4, 3)(torch.zeros(1, 3, 8, 8, dtype=torch.float16))


def test_each_process_finds_its_gpu_whether_it_sees_one_or_all():
    assert gpu_index(3, 8) == 3  # torchrun: every process sees the machine's 8 GPUs
    assert gpu_index(3, 1) == 0  # a launcher that sets CUDA_VISIBLE_DEVICES per rank
    assert gpu_index(0, 1) == 0


def test_gpus_that_torch_cannot_use_stop_auto_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "gpus_seen_by_the_driver", lambda: 8)
    with pytest.raises(UserError, match=r"nvidia-smi sees 8 GPU\(s\) but this PyTorch .* cannot use them"):
        resolve_device("auto")
    assert resolve_device("cpu").kind == "cpu"  # asked for explicitly, the CPU is fine
    monkeypatch.setattr(device_module, "gpus_seen_by_the_driver", lambda: 0)
    assert resolve_device("auto").kind == "cpu"  # no GPU at all: the CPU, as documented


def test_cuda_random_states_resume_on_fewer_or_more_gpus():
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # last.pt from 8 visible GPUs
    assert [(i, int(s[0])) for i, s in cuda_states_to_restore(saved, 1)] == [(0, 0)]
    assert [i for i, _ in cuda_states_to_restore(saved[:1], 8)] == [0]
    assert [i for i, _ in cuda_states_to_restore(saved, 8)] == list(range(8))


def test_linear_scaling_warms_up_then_follows_the_step_schedule():
    cfg = load_config(REPO / "config.yaml", ["train.lr_scaling=linear", "train.warmup_epochs=2",
                                             "train.batch_size=64", "train.lr_step_epochs=3"])
    stage = Stage("train", None, None, 10, 0.01, 3, None, "val_gap", "none")
    factor = lr_factor(cfg, stage, steps_per_epoch=10, world_size=8)  # global batch 512 = 16 x 32
    assert factor(0) == pytest.approx(16 / 20) and factor(9) == pytest.approx(16 / 2)
    assert factor(19) == pytest.approx(16) and factor(29) == pytest.approx(16)
    assert factor(30) == pytest.approx(1.6)  # epoch 4: the first step decay
    plain = lr_factor(load_config(REPO / "config.yaml"), stage, steps_per_epoch=10, world_size=8)
    assert plain(0) == 1.0 and plain(30) == pytest.approx(0.1)  # none: the original's lr, whatever the world


def test_a_compiled_models_checkpoint_resumes_and_submits(built, kaggle, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))  # cheap: no code generation
    cfg, _ = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards,
                            "model:\n  compile: true\ntrain:\n  batch_size: 8\nsubmit:\n  max_fallback_fraction: 1\n",
                            artifacts=tmp_path / "a", output=tmp_path / "out")
    train(load_config(cfg_path, ["train.epochs=1"]), "train")
    last = tmp_path / "a" / "train" / "checkpoints" / "last.pt"
    assert not [k for k in load_checkpoint(last)["model"] if "_orig_mod" in k or k.startswith("module.")]
    train(load_config(cfg_path, ["train.epochs=2"]), "train")  # resumes into a freshly compiled model
    assert load_checkpoint(last)["epoch"] == 2
    summary = submit(load_config(cfg_path), 2, tmp_path / "a" / "train" / "checkpoints" / "best.pt")
    assert summary["predicted"] > 0
