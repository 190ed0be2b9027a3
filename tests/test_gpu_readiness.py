"""What can be shown on a CPU of the GPU path: graphs that define, device and dtype choices, checkpoints
that travel between machines, the learning-rate schedule for many GPUs."""
from functools import partial

import pytest
import torch

from common.config import load_config
from common.errors import UserError
from common.shard_format import split_shards
from common import device as device_module
from common.device import Device, gpu_index, resolve_device
from dali_pipes.loader import output_dtype
from dali_pipes.pipelines import (Output, decode_only_pipeline, eval_pipeline, image_file_pipeline,
                                  train_pipeline)
from inference.submit import submit
from model.checkpoint import cuda_states_to_restore, load_checkpoint
from tests.fixtures import REPO, write_config
from training.train import train

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
            for machine_labels in (False, True):
                train_pipeline(shards.tars, shards.indexes, out=out, augmentation=augmentation, initial_fill=16,
                               enable_checkpointing=True, machine_labels=machine_labels, **GPU)
        for side in (40, 48, 56):  # a resolution schedule's sides: the 56-px window resized on the GPU
            for dtype in ("float16", "uint8"):
                train_pipeline(shards.tars, shards.indexes, out=Output(side, dtype, channels_last, (0.5,) * 3,
                                                                       (0.2,) * 3),
                               augmentation="crop_flip", initial_fill=16, enable_checkpointing=True, window=56, **GPU)
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
    gpu, cpu = Device("gpu", 0), Device("cpu", None)
    assert output_dtype("auto", gpu, None) == "float32"  # an fp32 model (train.amp off) gets float32
    assert output_dtype("auto", gpu, torch.float16) == "float16"
    assert output_dtype("auto", gpu, torch.bfloat16) == "float16"  # autocast casts it; DALI has no bfloat16
    assert output_dtype("auto", cpu, None) == "uint8"
    assert output_dtype("float32", gpu, torch.float16) == "float32"  # an explicit choice stands


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


@pytest.mark.slow
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


def test_gpu_decoders_upsample_chroma_as_the_cpu_does_and_size_buffers_for_their_images(built, tmp_path, monkeypatch):
    """nvJPEG's default chroma upsampling differs from libjpeg-turbo's (the CPU graphs, the shard builder); the
    test images are full-size originals, the shards 256-px images: each decoder gets hints for its own."""
    from nvidia.dali import fn
    calls = []
    for name in ("image", "image_crop", "image_random_crop"):
        original = getattr(fn.decoders, name)
        monkeypatch.setattr(fn.decoders, name, lambda *a, _f=original, _n=name, **kw: (calls.append((_n, kw)),
                                                                                       _f(*a, **kw))[1])
    cfg, _ = built
    shards = split_shards(cfg.paths.shards, "train")
    out = Output(56, "float16", True, (0.5,) * 3, (0.2,) * 3)
    graphs = {
        "train": lambda: train_pipeline(shards.tars, shards.indexes, out=out, augmentation="crop_flip",
                                        initial_fill=16, **GPU),
        "train rrc": lambda: train_pipeline(shards.tars, shards.indexes, out=out, augmentation="random_resized_crop",
                                            initial_fill=16, **GPU),
        "eval": lambda: eval_pipeline(shards.tars, shards.indexes, out=out, resize_shorter=64, tta="tencrop", **GPU),
        "test images": lambda: image_file_pipeline([tmp_path / "a.jpg"], out=out, resize_shorter=64, tta="none",
                                                   **GPU),
    }
    hints = {}
    for name, define in graphs.items():
        calls.clear()
        define()
        assert calls, name
        for _, kw in calls:
            assert kw["device"] == "mixed" and kw["jpeg_fancy_upsampling"] is True, name
            hints[name] = (kw["preallocate_width_hint"], kw["device_memory_padding"])
    assert hints["train"] == hints["eval"] == hints["train rrc"] == (512, 4 << 20)
    assert hints["test images"][0] >= 2048 and hints["test images"][1] > hints["eval"][1]


def test_a_scaler_state_saved_by_a_bf16_or_cpu_run_resumes_into_an_fp16_run(built, kaggle, tmp_path, monkeypatch):
    """A disabled GradScaler saves {}; an enabled one refuses to load it (RuntimeError) unless resume skips it."""
    cfg, _ = built
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, "train:\n  batch_size: 8\n",
                            artifacts=tmp_path / "a")
    train(load_config(cfg_path, ["train.epochs=1"]), "train")
    last = tmp_path / "a" / "train" / "checkpoints" / "last.pt"
    assert load_checkpoint(last, require=()).get("scaler") == {}
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled=True: scaler("cpu", enabled=True))
    train(load_config(cfg_path, ["train.epochs=2"]), "train")  # an enabled scaler, as an fp16 run has
    saved = load_checkpoint(last, require=())
    assert saved["epoch"] == 2 and saved["scaler"]["scale"] > 0


def test_dali_out_of_memory_is_an_error_of_the_run_not_a_bad_image():
    from common.cli import describe
    from inference.file_predictions import DecodeFailed, guarded
    message = ("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`, "
               "which was used in the pipeline definition with the following traceback: ...\n"
               "Can't allocate 805306368 bytes on device 0.")

    def loader():
        raise RuntimeError(message)
    with pytest.raises(RuntimeError) as raised:
        next(guarded(loader))
    assert not isinstance(raised.value, DecodeFailed)
    assert describe(raised.value, "predict.batch_size").startswith("out of GPU memory (Critical error in pipeline:")
    with pytest.raises(DecodeFailed):  # the control: a decoding failure stays one
        next(guarded(lambda: (_ for _ in ()).throw(RuntimeError("nvImageCodec failure: '#4'"))))


def test_each_rank_resumes_its_own_random_state():
    from model.checkpoint import rank_rng_state
    saved = {"rng": "rank0", "rng_per_rank": ["rank0", "rank1", "rank2"], "world_size": 3}
    assert [rank_rng_state(saved, r, 3) for r in range(3)] == ["rank0", "rank1", "rank2"]
    assert rank_rng_state(saved, 1, 2) == "rank0"  # another world: rank 0's for all
    assert rank_rng_state({"rng": "rank0", "world_size": 3}, 2, 3) == "rank0"  # older checkpoints


def test_a_one_process_torchrun_run_sets_up_a_real_process_group(monkeypatch):
    """torchrun with one process (one GPU) runs DDP and the collectives, as eight would."""
    import socket
    from common import distributed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert not distributed.setup(Device("cpu", None)).active  # a plain run: no group
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    d = distributed.setup(Device("cpu", None))
    try:
        assert d.active and distributed.backend(d) == "gloo"
        t = torch.ones(2)
        distributed.all_reduce(d, t)
        assert distributed.gather_objects(d, "x") == ["x"] and t.tolist() == [1, 1]
    finally:
        distributed.teardown(d)


def test_submit_screens_the_images_before_the_model_goes_to_the_device(built, kaggle, tmp_path, monkeypatch):
    """The screening forks worker processes: a CUDA context in the parent does not survive a fork."""
    import inference.submit as submit_module
    from model.network import create_model
    from model.checkpoint import save_checkpoint
    from common.vocab import Vocabulary
    cfg, _ = built
    vocab = Vocabulary.load(cfg.paths.shards)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"model": create_model("test_resnet", len(vocab)).state_dict(), "model_name": "test_resnet",
                           "classes": vocab.codes})
    order = []
    for name in ("screen", "member_models"):
        original = getattr(submit_module, name)
        monkeypatch.setattr(submit_module, name, lambda *a, _f=original, _n=name, **kw: (order.append(_n),
                                                                                         _f(*a, **kw))[1])
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, "submit:\n  max_fallback_fraction: 1\n",
                            output=tmp_path / "out")
    submit(load_config(cfg_path), 2, ckpt)
    assert order == ["screen", "member_models"]


def test_model_amp_dtype_chooses_the_autocast_dtype(monkeypatch):
    from common.runtime import autocast_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    assert autocast_dtype(True, True, "auto") == torch.bfloat16
    assert autocast_dtype(True, True, "float16") == torch.float16  # the GradScaler path, on any GPU
    assert autocast_dtype(False, True, "float16") is None and autocast_dtype(True, False, "float16") is None


def test_the_throughput_benchmark_times_trainings_own_step_with_its_autocast_dtype(monkeypatch):
    import training.train
    from benchmarks import throughput
    seen = []
    monkeypatch.setattr(training.train, "training_step",
                        lambda net, opt, scaler, loss_fn, inputs, targets, amp: seen.append((inputs.dtype, amp)))
    cfg = load_config(REPO / "config.yaml", ["model.channels_last=false"])
    step = throughput.training_step_fn("test_resnet", 5, Device("cpu", None), cfg, torch.bfloat16)
    step(lambda x: x.half())((torch.zeros(2, 3, 8, 8), torch.zeros(2, 5)))
    assert seen == [(torch.float16, torch.bfloat16)]


def test_every_gpu_graph_hands_its_batches_over_on_the_gpu(built, tmp_path):
    """Every output a GPU graph hands to PyTorch is on the GPU, but the two the host reads itself (eval's image
    ids, the test images' positions): a mask left on the CPU (the uint8 graph's flip coins) would make the loader's
    torch.where fail on the first GPU batch."""
    cfg, _ = built
    shards = split_shards(cfg.paths.shards, "train")
    on_host = {"eval": {2}, "files": {1}}  # output positions: meta (ids), positions
    graphs = []
    for dtype in ("float16", "float32", "uint8"):
        out = Output(56, dtype, True, (0.5,) * 3, (0.2,) * 3)
        for augmentation in ("crop_flip", "random_resized_crop"):
            for machine_labels in (False, True):
                for window in (None, 56):
                    graphs.append(("train", train_pipeline(
                        shards.tars, shards.indexes, out=out, augmentation=augmentation, initial_fill=16,
                        enable_checkpointing=True, machine_labels=machine_labels, window=window, **GPU)))
        for resize in (None, 64):
            for tta in ("none", "tencrop"):
                graphs.append(("eval", eval_pipeline(shards.tars, shards.indexes, out=out, resize_shorter=resize,
                                                     tta=tta, **GPU)))
        graphs.append(("files", image_file_pipeline([tmp_path / "a.jpg"], out=out, resize_shorter=64, tta="tencrop",
                                                    **GPU)))
    for kind, pipe in graphs:
        devices = [node.device for node in pipe._graph_out]
        assert devices == ["cpu" if k in on_host.get(kind, ()) else "gpu" for k in range(len(devices))], \
            (kind, [node.name for node in pipe._graph_out], devices)


def test_the_loader_mirrors_crops_with_coins_from_anywhere_where_the_crops_are():
    from dali_pipes.loader import mirror_crops
    crops = torch.arange(2 * 2 * 3 * 3, dtype=torch.uint8).view(2, 2, 3, 3)  # [B, H, W, C]
    coins = torch.tensor([[1], [0]], dtype=torch.uint8)
    flipped = mirror_crops(crops.clone(), coins)
    assert torch.equal(flipped[0], crops[0].flip(-2)) and torch.equal(flipped[1], crops[1])
    # on a device other than the CPU ("meta": shapes only) the mask goes where the crops are
    assert mirror_crops(crops.to("meta"), coins).device.type == "meta"


def test_processes_that_share_a_gpu_take_gloo_and_one_a_gpu_take_nccl():
    from common.distributed import backend_for
    assert backend_for(on_gpu=True, processes_here=8, gpus_here=8) == "nccl"
    assert backend_for(on_gpu=True, processes_here=2, gpus_here=1) == "gloo"  # NCCL refuses two ranks on one GPU
    assert backend_for(on_gpu=False, processes_here=4, gpus_here=0) == "gloo"
