"""Failures named for what they are, on the libraries' own words: each error is produced here, on the CPU, by
DALI or PyTorch themselves, and classified as the commands classify it (``common.errors.failure_kind``, the
loaders' ``shard_errors``, the command frame's ``describe``)."""
import shutil

import numpy as np
import pytest
import torch

from common.cli import describe
from common.errors import failure_kind
from dali_pipes.loader import DamagedShard, ForeignState, ImageFileLoader, build_train_pipeline, eval_loader
from tests.fixtures import corrupt_huffman_table, jpeg_bytes, photo, pipes, split


def raised(call) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_an_image_the_decoder_rejects_is_the_image_s_fault_in_dali_s_words_on_either_device(built, tmp_path):
    cfg, _ = built
    bad = tmp_path / "a.jpg"
    bad.write_bytes(corrupt_huffman_table(jpeg_bytes(photo(np.random.default_rng(0)))))
    error = raised(lambda: next(iter(ImageFileLoader(pipes(cfg), [bad], 1))))
    assert "Failed to decode sample #0 : " in str(error) and failure_kind(error) == "other"
    # the mixed decoder runs the same nvImageCodec decoder code and says the same; where its message carries one
    # of nvJPEG's statuses for a bad stream (DALI's NvjpegError), the image is still at fault, not the GPU
    for status in ("nvJPEG error (3): Cannot parse the JPEG stream. Check that the encoded JPEG stream and its "
                   "size parameters are correct.", "nvJPEG error (4): Attempting to decode a JPEG stream that is "
                   "not supported by the nvJPEG library."):
        assert failure_kind(RuntimeError(f"{error}\n{status}")) == "other"
    # the control: nvJPEG failing to run is the machine's
    assert failure_kind(RuntimeError("nvJPEG error (6): Error during the execution of the device tasks.")) == "device"


@pytest.mark.parametrize("damage", ["truncated tar", "missing index"])
def test_a_damaged_shard_folder_is_a_damaged_shard(built, tmp_path, damage):
    cfg, _ = built
    shards = tmp_path / "shards"
    shutil.copytree(cfg.paths.shards, shards)
    val = split(cfg.with_overrides([f"paths.shards={shards}"]), "val")
    if damage == "truncated tar":
        val.tars[0].write_bytes(val.tars[0].read_bytes()[: val.tars[0].stat().st_size // 3])
    else:
        val.indexes[0].unlink()
    error = raised(lambda: list(eval_loader(pipes(cfg), val, 4)))
    assert isinstance(error, DamagedShard) and val.tars[0].name in str(error)


def test_a_checkpoint_of_another_graph_is_named_so_not_a_damaged_shard(built):
    cfg, _ = built
    train = split(cfg, "train")
    first = build_train_pipeline(pipes(cfg), train, 4)
    first.run()
    error = raised(lambda: build_train_pipeline(pipes(cfg.with_overrides(["pipeline.dtype=float32"])), train, 4,
                                                checkpoint=first.checkpoint()))
    assert isinstance(error, ForeignState) and "as a name of an operator" in str(error)


def test_pytorch_s_allocator_running_out_is_out_of_memory_with_the_keys_to_lower():
    error = raised(lambda: torch.empty(1 << 62, dtype=torch.uint8))
    assert failure_kind(error) == "out_of_memory"
    assert describe(error, "predict.batch_size").startswith("out of memory (") and "lower predict.batch_size" in \
        describe(error, "predict.batch_size")
