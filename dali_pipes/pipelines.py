"""The DALI graphs, one per purpose. Each reads top to bottom like the recipe it implements.

Every graph runs on the GPU (``device="mixed"`` decoding, the rest on the device) or, with
``device_id=None``, entirely on the CPU. Crops are taken before any per-pixel float work,
and the train crop is decoded alone (ROI decoding). With ``dtype="uint8"`` the graphs stop
at uint8 crops (HWC; the train graph hands over its random flips for the loader to apply) and
``common.runtime.InputAdapter`` normalises them where the model runs: on a CPU, normalising in DALI costs as much as decoding, and on a GPU it is free.
"""
from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types

from common.shard_format import MACHINE_EXTENSIONS

READER = "reader"
# (crop_pos_x, crop_pos_y) of the four corners and the centre; tencrop adds their mirror images
FIVE_CROPS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
DALI_TYPES = {"float16": types.FLOAT16, "float32": types.FLOAT, "uint8": types.UINT8}

# nvJPEG's buffers, preallocated as DALI's docs advise so they do not regrow, sized for what each graph decodes.
# The paddings are per thread (host: pinned memory) and DALI's pools never shrink (DALI issues #5087, #5609):
# 64 MiB each cost 256 MiB of device and 512 MiB of pinned memory per 4-thread pipeline.
# Shards hold 256-px-short-side images, rarely over 1024 px long (at most 3 MiB decoded).
SHARD_DECODER_BUFFERS = dict(device_memory_padding=4 << 20, host_memory_padding=4 << 20,
                             preallocate_width_hint=512, preallocate_height_hint=512)
# The stage-1/2 test images are the full-size originals (Open Images: often 1024 px on the long side, some
# larger): hints and paddings for ~12 MiB decoded images, so the first batches do not reallocate.
ORIGINAL_DECODER_BUFFERS = dict(device_memory_padding=16 << 20, host_memory_padding=16 << 20,
                                preallocate_width_hint=2048, preallocate_height_hint=2048)
# jpeg_fancy_upsampling: nvJPEG upsamples chroma as libjpeg-turbo does (the CPU graphs and the shard builder),
# so a GPU run sees the pixels the CPU graphs were tested with
GPU_DECODER_ARGS = dict(hw_decoder_load=0.65, jpeg_fancy_upsampling=True)


@dataclass(frozen=True)
class Output:
    """What a graph hands over: ``dtype`` float16/float32 (normalised; HWC when ``channels_last``, else CHW)
    or uint8 (raw crops, always HWC)."""
    crop: int
    dtype: str
    channels_last: bool
    mean: tuple
    std: tuple


def read_shards(tars, indexes, *, with_meta: bool, shuffle: bool, initial_fill: int, shard_id: int,
                num_shards: int, seed: int, order_seed: int | None = None, with_machine: bool = False):
    """The split's samples: JPEG bytes, class indices (int32), for eval the JSON metadata and, ``with_machine``,
    the machine labels (int32) and their confidences (float32).

    Shuffled (training), the tars are read in a new order every epoch, drawn from ``order_seed``, which must be
    the same on every rank: each rank then reads its own slice of the same order, so an epoch still holds every
    sample once across the ranks. The ``initial_fill`` buffer (``seed``: each rank's own) mixes samples within
    and across neighbouring shards. Without the new order, the buffer alone leaves every epoch in nearly the
    order of the one before: the shards were shuffled once, when they were built."""
    ext = ["jpg", "labels"] + (["json"] if with_meta else []) + (list(MACHINE_EXTENSIONS) if with_machine else [])
    dtypes = ([types.UINT8, types.INT32] + ([types.UINT8] if with_meta else [])
              + ([types.INT32, types.FLOAT] if with_machine else []))
    order = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=order_seed) if shuffle else {}
    return fn.readers.webdataset(
        paths=[str(t) for t in tars], index_paths=[str(i) for i in indexes], ext=ext, dtypes=dtypes,
        missing_component_behavior="error", random_shuffle=shuffle, initial_fill=initial_fill,
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=not shuffle, seed=seed, name=READER, **order)


def decoder_args(on_gpu: bool, buffers: dict = SHARD_DECODER_BUFFERS) -> dict:
    """The decoder's device and, on the GPU, nvJPEG's settings with buffers sized for ``buffers``' images."""
    return dict(device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                **({**GPU_DECODER_ARGS, **buffers} if on_gpu else {}))


def decode(jpegs, on_gpu: bool, crop: int | None = None, crop_pos_x=0.5, crop_pos_y=0.5,
           buffers: dict = SHARD_DECODER_BUFFERS):
    """JPEG -> HWC uint8 RGB; on the GPU with nvJPEG (and the hardware decoder where there is one).

    With ``crop`` only that window is decoded (libjpeg-turbo skips the rest; nvJPEG decodes the
    ROI): the same pixels as decoding the whole image and cropping, for less work.
    """
    args = decoder_args(on_gpu, buffers)
    if crop is None:
        return fn.decoders.image(jpegs, **args)
    return fn.decoders.image_crop(jpegs, crop=(crop, crop), crop_pos_x=crop_pos_x, crop_pos_y=crop_pos_y, **args)


def finish(images, out: Output, crop: bool = True, crop_pos_x=0.5, crop_pos_y=0.5, mirror=0):
    """(Crop,) flip and normalise the cropped pixels only, in one fused operator."""
    window = dict(crop=(out.crop, out.crop), crop_pos_x=crop_pos_x, crop_pos_y=crop_pos_y) if crop else {}
    if out.dtype == "uint8":
        if window:
            images = fn.crop(images, **window)
        return fn.flip(images, horizontal=mirror)
    return fn.crop_mirror_normalize(
        images, mirror=mirror, dtype=DALI_TYPES[out.dtype], output_layout="HWC" if out.channels_last else "CHW",
        mean=[255 * m for m in out.mean], std=[255 * s for s in out.std], **window)


def tta_crops(images, tta: str, out: Output):
    """none: the centre crop; flip: it and its mirror; tencrop: four corners + centre, and mirrors."""
    if tta == "none":
        return finish(images, out)
    positions = [(0.5, 0.5)] if tta == "flip" else FIVE_CROPS
    return fn.stack(*[finish(images, out, True, x, y, mirror) for mirror in (0, 1) for x, y in positions])


def resize_and_crop(jpegs, on_gpu: bool, resize_shorter: int | None, tta: str, out: Output,
                    buffers: dict = SHARD_DECODER_BUFFERS):
    """Short side to ``resize_shorter`` (None: already that size), then the centre or TTA crops."""
    if resize_shorter is None and tta == "none":
        return finish(decode(jpegs, on_gpu, out.crop, buffers=buffers), out, crop=False)
    images = decode(jpegs, on_gpu, buffers=buffers)
    if resize_shorter is not None:
        images = fn.resize(images, resize_shorter=resize_shorter, antialias=True)
    return tta_crops(images, tta, out)


def pad_labels(labels, on_gpu: bool, fill_value=-1):
    """Ragged class lists (or their confidences) -> one dense matrix per batch, ``fill_value`` where a row is
    shorter."""
    padded = fn.pad(labels, fill_value=fill_value, axes=(0,))
    return padded.gpu() if on_gpu else padded


@pipeline_def(enable_conditionals=False)
def train_pipeline(tars, indexes, *, on_gpu: bool, out: Output, augmentation: str, initial_fill: int,
                   shard_id: int = 0, num_shards: int = 1, reader_seed: int = 0, order_seed: int = 0,
                   machine_labels: bool = False, window: int | None = None):
    """The original augmentation: random 224 crop of the 256-short-side image, random flip, ImageNet norm.
    ``window``: the crop is a ``window``-px window resized to ``out.crop`` px (a resolution schedule's epoch: the
    same field of view at fewer pixels); None: the window is ``out.crop`` itself. Outputs (images, labels), for
    uint8 crops with the mirror coins (the flip is the loader's to apply), and last, with ``machine_labels``, the
    machine labels and confidences: ``train_outputs`` names them."""
    read = read_shards(tars, indexes, with_meta=False, shuffle=True, initial_fill=initial_fill, shard_id=shard_id,
                       num_shards=num_shards, seed=reader_seed, order_seed=order_seed, with_machine=machine_labels)
    jpegs, labels = read[:2]
    machine = (pad_labels(read[2], on_gpu), pad_labels(read[3], on_gpu, 0.0)) if machine_labels else ()
    if augmentation == "random_resized_crop":  # the ImageNet recipe, as a config option
        images = fn.decoders.image_random_crop(jpegs, random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3),
                                               **decoder_args(on_gpu))
        images = fn.resize(images, size=(out.crop, out.crop), antialias=True)
    else:
        images = decode(jpegs, on_gpu, window or out.crop, fn.random.uniform(range=(0.0, 1.0)),
                        fn.random.uniform(range=(0.0, 1.0)))
        if window is not None:  # even at the window's own size: every size then runs the same operators
            images = fn.resize(images, size=(out.crop, out.crop), antialias=True)
    mirror = fn.random.coin_flip(probability=0.5)
    if out.dtype == "uint8":
        # Raw crops are handed over with their coin, and the loader mirrors them as it copies them out of DALI's
        # buffers (which it does anyway): a flip in DALI is one more pass over every crop, a fifth of the CPU
        # graph's time (docs/BENCHMARKS.md). The coin stays here, so DALI's checkpoint keeps its random state; it
        # goes where the crops go (on a GPU, torch.where takes no mask from the host).
        return images, pad_labels(labels, on_gpu), mirror.gpu() if on_gpu else mirror, *machine
    return finish(images, out, crop=False, mirror=mirror), pad_labels(labels, on_gpu), *machine


def train_outputs(out: Output, machine_labels: bool) -> list[str]:
    """The names of ``train_pipeline``'s outputs, in order."""
    return (["images", "labels"] + (["mirror"] if out.dtype == "uint8" else [])
            + (["machine_labels", "machine_conf"] if machine_labels else []))


@pipeline_def(enable_conditionals=False)
def eval_pipeline(tars, indexes, *, on_gpu: bool, out: Output, resize_shorter: int | None, tta: str,
                  shard_id: int = 0, num_shards: int = 1):
    """Every sample once, in shard order: (resize short side,) centre crop or test-time crops, normalise."""
    jpegs, labels, meta = read_shards(tars, indexes, with_meta=True, shuffle=False, initial_fill=1,
                                      shard_id=shard_id, num_shards=num_shards, seed=0)
    images = resize_and_crop(jpegs, on_gpu, resize_shorter, tta, out)
    return images, pad_labels(labels, on_gpu), fn.pad(meta, fill_value=0, axes=(0,))


@pipeline_def(enable_conditionals=False)
def image_file_pipeline(files, *, on_gpu: bool, out: Output, resize_shorter: int, tta: str,
                        shard_id: int = 0, num_shards: int = 1):
    """Stage-1/2 test images: plain JPEG files, the eval graph; the label is the file's position."""
    jpegs, position = fn.readers.file(files=[str(f) for f in files], labels=list(range(len(files))),
                                      random_shuffle=False, pad_last_batch=True, shard_id=shard_id,
                                      num_shards=num_shards, name=READER)
    return resize_and_crop(jpegs, on_gpu, resize_shorter, tta, out, ORIGINAL_DECODER_BUFFERS), position


@pipeline_def(enable_conditionals=False)
def decode_only_pipeline(tars, indexes, *, on_gpu: bool):
    """The ceiling for every other graph: reading and decoding whole images, nothing else."""
    jpegs, _ = read_shards(tars, indexes, with_meta=False, shuffle=False, initial_fill=1, shard_id=0,
                           num_shards=1, seed=0)
    return decode(jpegs, on_gpu)
