"""The loaders that training and inference use: DALI pipelines wrapped as PyTorch iterables.

    settings = PipeSettings.from_config(cfg, runtime)          # at the command's edge
    for images, targets in train_loader(settings, shards, batch_size, rank, world_size): ...
    for images, targets, image_ids in eval_loader(settings, shards, batch_size, rank, world_size): ...
    for images, positions in ImageFileLoader(settings, files, batch_size): ...

Images arrive on the pipeline's device in one of two forms: normalised float from a GPU
pipeline (with no copy through the host), or uint8 HWC crops from a CPU pipeline;
``common.runtime.InputAdapter`` turns either into the model's input. Targets arrive as a multi-hot float
matrix ``[batch, num_classes]`` on the same device; trained with machine labels, a machine
label's entry is its confidence (soft targets; a human label's is 1).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from common.device import Device
from common.errors import DamagedData, UserError, failure_kind
from common.seeds import int_seed
from common.shard_format import SplitShards, decode_meta
from dali_pipes.settings import PipeSettings
from dali_pipes.pipelines import (READER, Output, eval_pipeline, image_file_pipeline, train_outputs,
                                  train_pipeline)


def multi_hot(padded: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[batch, max_labels]`` class indices padded with -1 -> ``[batch, num_classes]`` of 0/1, same device."""
    index = padded.long()
    index = torch.where(index >= 0, index, num_classes)  # padding goes to a spare column, dropped below
    out = torch.zeros(index.shape[0], num_classes + 1, device=index.device)
    out.scatter_(1, index, 1.0)
    return out[:, :num_classes]


def with_machine_labels(targets: torch.Tensor, classes: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
    """The human multi-hot ``targets`` with each machine label's confidence where no human label is (the shards
    hold none where a human labeled the class, and a human positive's 1 stays the maximum anyway)."""
    num_classes = targets.shape[1]
    index = classes.long()
    index = torch.where(index >= 0, index, num_classes)
    soft = torch.zeros(index.shape[0], num_classes + 1, device=targets.device)
    soft.scatter_(1, index, confidences.float())
    return torch.maximum(targets, soft[:, :num_classes])


def mirror_crops(images: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """Mirrors, in place, the HWC crops of ``images`` whose ``mirror`` flag is set (the train graph's coins)."""
    flags = mirror.view(-1).bool()
    if images.device.type != "cpu":  # no host sync on a GPU, where a second pass over the batch costs nothing
        flags = flags.to(images.device, non_blocking=True)  # (the GPU graph hands its coins over on the GPU)
        return torch.where(flags.view(-1, 1, 1, 1), images.flip(-2), images)
    # On a CPU only the flipped half is touched, one crop at a time, in place, by OpenCV: its flip of 3-channel
    # uint8 rows is 4x faster than torch.flip's (0.08 vs 0.30 ms a batch of 32 224-px crops), and the loader's
    # own time is taken from DALI's threads on a small CPU.
    pixels = images.numpy()
    for i in flags.nonzero().view(-1).tolist():
        cv2.flip(pixels[i], 1, dst=pixels[i])
    return images


def decode_ids(padded_json: torch.Tensor) -> list[str]:
    """Image ids from the zero-padded ``.json`` bytes of an eval batch."""
    return [decode_meta(row)["image_id"] for row in padded_json.cpu().numpy()]


def output_dtype(choice: str, device: Device, amp_dtype: torch.dtype | None = None) -> str:
    """``auto`` follows where the model runs and its autocast dtype: on the GPU float16 normalised in DALI under
    autocast (fp16 or bf16: autocast casts the input; DALI has no bfloat16), float32 for an fp32 model; on the
    CPU uint8 crops, normalised by ``common.runtime.InputAdapter`` (DALI's CPU normalisation costs as much as the
    decode; see docs/BENCHMARKS.md)."""
    if choice != "auto":
        return choice
    if device.kind != "gpu":
        return "uint8"
    return "float16" if amp_dtype is not None else "float32"


def _pipe_args(settings: PipeSettings, batch_size: int, seed: int, crop: int | None = None) -> dict:
    out = Output(crop or settings.crop_size, output_dtype(settings.dtype, settings.device, settings.amp_dtype),
                 settings.channels_last, settings.mean, settings.std)
    return dict(batch_size=batch_size, num_threads=settings.threads, device_id=settings.device.device_id,
                prefetch_queue_depth=settings.prefetch_queue_depth, seed=seed, on_gpu=settings.on_gpu, out=out)


def check_data_settings(settings: PipeSettings, shards: SplitShards, resizes: bool,
                        machine_labels: bool = False) -> None:
    """The image settings against the shards' manifest, before any work: a crop larger than the image makes DALI
    fail (or crash) mid-run. ``resizes``: the graph resizes to ``data.shortest_side`` (eval), else it crops the
    shards' images as they are (train), which must then have the short side the config says. ``machine_labels``:
    the graph reads the machine labels, which the shards must then hold."""
    folder = shards.tars[0].parent
    if machine_labels and not shards.machine_labels:
        raise UserError(f"data.machine_labels is true, but the shards in {folder} were built without "
                        "machine labels: rebuild them with data.machine_labels=true (python -m "
                        "preprocessing.build_shards --restart, or into another paths.shards), or set "
                        "data.machine_labels=false")
    built, side, crop = shards.shortest_side, settings.shortest_side, settings.crop_size
    if not resizes and built != side:
        raise UserError(f"the shards in {folder} were built with data.shortest_side={built}, the config "
                        f"says {side}: rebuild them with python -m preprocessing.build_shards (into another "
                        f"paths.shards), or set data.shortest_side={built}")
    if crop > side:
        raise UserError(f"pipeline.crop_size={crop} does not fit in the images, whose short side is {side} "
                        f"(data.shortest_side): lower pipeline.crop_size, or build shards with a larger "
                        "data.shortest_side")


def check_test_image_settings(crop_size: int, shortest_side: int) -> None:
    """The test-image graph resizes to ``data.shortest_side`` and crops ``pipeline.crop_size``."""
    if crop_size > shortest_side:
        raise UserError(f"pipeline.crop_size={crop_size} does not fit in the test images, resized to "
                        f"a short side of {shortest_side} (data.shortest_side): lower pipeline.crop_size")


def eval_resize(settings: PipeSettings, shards: SplitShards) -> int | None:
    """Shards already have the configured short side: then eval skips the resize and decodes only the crop."""
    return None if shards.shortest_side == settings.shortest_side else settings.shortest_side


@dataclass
class DaliLoader:
    """One pass over a split per ``iter()``; yields (images, targets[, image_ids]) as torch tensors."""
    iterator: DALIGenericIterator
    num_classes: int
    with_ids: bool
    shards: SplitShards
    machine_labels: bool = False  # the batches carry machine labels: targets are soft
    size: int = 0  # the side of its crops

    def __len__(self) -> int:
        return len(self.iterator)  # DALI's count: equal on every rank, as lockstep training needs

    def checkpoint(self) -> str:
        """DALI's state after the batches handed over so far (prefetched ones are not counted)."""
        return self.iterator.checkpoints()[0]

    def stream(self):
        """Batches without end, pass after pass: a training run takes every epoch's steps from one stream, so
        stopping a pass early (``train.max_steps_per_epoch``) never restarts or rebuilds the pipeline."""
        while True:
            yield from self

    def __iter__(self):
        batches = iter(self.iterator)
        while True:
            with shard_errors(self.shards):  # DALI's reading and decoding only: the torch work below is not data's
                try:
                    out = next(batches)[0]
                except StopIteration:
                    return
            images = mirror_crops(out["images"], out["mirror"]) if "mirror" in out else out["images"]
            targets = multi_hot(out["labels"], self.num_classes)
            if self.machine_labels:
                targets = with_machine_labels(targets, out["machine_labels"], out["machine_conf"])
            if self.with_ids:
                yield images, targets, decode_ids(out["meta"])
            else:
                yield images, targets


class DamagedShard(DamagedData):
    """A shard that DALI cannot read: one line naming it (and its sample, where DALI names it)."""


class ForeignState(Exception):
    """A DALI checkpoint saved by another graph (DALI restores by operator name): the caller decides what to do."""


# DALI's words when a checkpoint names operators this graph does not have
FOREIGN_STATE = re.compile(r"doesn't recognize \S+ as a name of an operator")


# DALI names the sample it failed on as "<tar path>:<offset>:<key>.<extension>"
SAMPLE_SOURCE = re.compile(r"(\S+\.tar):\d+:(\S+?)\.\w+\b")
# the line of DALI's message that says what went wrong (the rest is DALI's own traceback and C++ context)
DALI_CAUSE = re.compile(r"^(?!Critical error|Error in |which was used|  File |    |encountered|C\+\+ context|"
                        r"Current pipeline)\S.*", re.MULTILINE)


def describe_shards(shards: SplitShards) -> str:
    names = [t.name for t in shards.tars]
    listed = names[0] if len(names) == 1 else f"{len(names)} shards, {names[0]} to {names[-1]}"
    return f"{listed} in {shards.tars[0].parent}"


def damaged_shard(exc: RuntimeError, shards: SplitShards) -> DamagedShard:
    """The one-line error for a DALI failure while reading shards: the shard and sample where DALI names them,
    else the shards being read; with DALI's own words either way."""
    text = str(exc)
    found = SAMPLE_SOURCE.search(text)
    if found:
        why = "does not decode" if "decode" in text else "cannot be read"
        return DamagedShard(f"{found.group(1)}: sample {found.group(2)} {why} (a damaged shard)")
    cause = DALI_CAUSE.search(text)
    return DamagedShard(f"DALI could not read the shards ({describe_shards(shards)}): "
                        f"{cause.group(0).strip() if cause else type(exc).__name__}; a shard may be damaged")


@contextlib.contextmanager
def shard_errors(shards: SplitShards):
    """A failure of DALI's reading or decoding becomes one DamagedShard line; running out of memory and a fault
    of the GPU or its driver (``common.errors.failure_kind``, DALI's words too) stay what they are, errors of
    the run, and a checkpoint of another graph is a ForeignState, not a damaged shard."""
    try:
        yield
    except RuntimeError as exc:
        if failure_kind(exc) != "other":
            raise
        if FOREIGN_STATE.search(str(exc)):
            raise ForeignState(DALI_CAUSE.search(str(exc)).group(0).strip()) from None
        raise damaged_shard(exc, shards) from None


def train_graph(settings: PipeSettings, machine_labels: bool, resized: bool) -> str:
    """What the train graph's operators depend on, in words. DALI restores a checkpoint by operator name, so the
    state of a graph with another description (a CPU run's, another output dtype's, with or without machine labels
    or a resolution schedule's resize) does not restore into this one: checkpoints record it to tell."""
    dtype = output_dtype(settings.dtype, settings.device, settings.amp_dtype)
    return ", ".join([f"{settings.device.kind} graph", f"{dtype} crops", settings.augmentation,
                      "resized" if resized else "not resized",
                      "with machine labels" if machine_labels else "human labels"])


def train_reader_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """(the shuffle buffer's seed: this rank's own, for a pipeline that starts at ``epoch``; the seed of the tars'
    order: the same on every rank and for every start, since DALI's checkpoint restores the reader's place in
    that order but not its seed, so a resumed pipeline must be built with the seed the first one had), both
    from the training seed. (A run that starts afresh at a later epoch, as one does on another number of
    processes, reads the tars in epoch 1's order again, its buffer mixing them otherwise.)"""
    return int_seed(seed, "train_reader", epoch, rank), int_seed(seed, "train_shard_order")


def build_train_pipeline(settings: PipeSettings, shards: SplitShards, batch_size: int, rank: int = 0,
                         world_size: int = 1, epoch: int = 0, checkpoint: str | None = None,
                         machine_labels: bool = False, size: int | None = None):
    """The built train graph; each rank shuffles with its own seed derived from the training seed (and the epoch
    the pipeline starts at). With ``checkpoint`` (``DaliLoader.checkpoint()`` of an earlier run, or of a pipeline
    of another ``size``) it goes on exactly where that one stood: reader position, shuffle and augmentation random
    state. ``size``: crops of ``pipeline.crop_size`` resized to this side (a resolution schedule); None: crops of
    ``pipeline.crop_size`` as they are."""
    seed, order_seed = train_reader_seeds(settings.seed, epoch, rank)
    pipe = train_pipeline(shards.tars, shards.indexes, augmentation=settings.augmentation,
                          initial_fill=settings.shuffle_buffer, shard_id=rank, num_shards=world_size,
                          reader_seed=seed, order_seed=order_seed, enable_checkpointing=True, checkpoint=checkpoint,
                          machine_labels=machine_labels, window=None if size is None else settings.crop_size,
                          **_pipe_args(settings, batch_size, seed, size))
    with shard_errors(shards):  # building opens the shards and their indexes
        pipe.build()
    return pipe


def train_loader(settings: PipeSettings, shards: SplitShards, batch_size: int, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, checkpoint: str | None = None, machine_labels: bool = False,
                 size: int | None = None) -> DaliLoader:
    """Shuffled, augmented batches; a fresh order every pass, the same orders for the same seed. Build it once
    per run (and again, from its ``checkpoint()``, where a resolution schedule changes ``size``): each pass
    (``iter()``) continues the same pipeline, and ``stream()`` runs across passes. ``machine_labels``: soft
    targets from the shards' machine labels too."""
    check_data_settings(settings, shards, resizes=False, machine_labels=machine_labels)
    if shards.samples // world_size < batch_size:  # DALI's count of whole batches per rank, equal on every rank
        raise UserError(f"the training data ({describe_shards(shards)}) has {shards.samples} images for "
                        f"{world_size} process(es), fewer than one batch of {batch_size} each: lower the "
                        "stage's batch_size")
    pipe = build_train_pipeline(settings, shards, batch_size, rank, world_size, epoch, checkpoint, machine_labels,
                                size)
    outputs = train_outputs(_pipe_args(settings, batch_size, 0)["out"], machine_labels)
    with shard_errors(shards):  # DALI reads and decodes its first batches while the iterator is built
        it = DALIGenericIterator(pipe, outputs, reader_name=READER, auto_reset=True,
                                 last_batch_policy=LastBatchPolicy.DROP)
    return DaliLoader(it, shards.num_classes, with_ids=False, shards=shards, machine_labels=machine_labels,
                      size=size or settings.crop_size)


def eval_loader(settings: PipeSettings, shards: SplitShards, batch_size: int, rank: int = 0, world_size: int = 1,
                tta: str = "none") -> DaliLoader:
    """Every sample of this rank's part exactly once per pass, the last partial batch included."""
    check_data_settings(settings, shards, resizes=True)
    if shards.samples < world_size:  # DALI would stop on an assertion
        raise UserError(f"{describe_shards(shards)} hold {shards.samples} images, fewer than the {world_size} "
                        "processes that each predict a part of them: use fewer processes")
    pipe = eval_pipeline(shards.tars, shards.indexes, resize_shorter=eval_resize(settings, shards), tta=tta,
                         shard_id=rank, num_shards=world_size, **_pipe_args(settings, batch_size, 0))
    with shard_errors(shards):
        pipe.build()
        it = DALIGenericIterator(pipe, ["images", "labels", "meta"], reader_name=READER, auto_reset=True,
                                 last_batch_policy=LastBatchPolicy.PARTIAL)
    return DaliLoader(it, shards.num_classes, with_ids=True, shards=shards)


class ImageFileLoader:
    """Batches of (images, positions) over a list of JPEG files; positions index that list. ``resolution``:
    (short side, crop) to resize and crop to, else the training one (``data.shortest_side``,
    ``pipeline.crop_size``)."""

    def __init__(self, settings: PipeSettings, files: list[Path], batch_size: int, tta: str = "none",
                 rank: int = 0, world_size: int = 1, resolution: tuple[int, int] | None = None):
        if resolution is None:
            check_test_image_settings(settings.crop_size, settings.shortest_side)
        short, crop = resolution or (settings.shortest_side, settings.crop_size)
        pipe = image_file_pipeline(files, resize_shorter=short, tta=tta, shard_id=rank, num_shards=world_size,
                                   **_pipe_args(settings, batch_size, 0, crop))
        pipe.build()
        self.iterator = DALIGenericIterator(pipe, ["images", "positions"], reader_name=READER, auto_reset=True,
                                            last_batch_policy=LastBatchPolicy.PARTIAL)

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self):
        for batch in self.iterator:
            yield batch[0]["images"], batch[0]["positions"].view(-1).cpu().long()
