"""The DALI graphs, one per purpose. Each reads top to bottom like the recipe it implements.

Every graph runs on the GPU (``device="mixed"`` decoding, the rest on the device) or, with
``device_id=None``, entirely on the CPU. Crops are taken before any float work: normalising
a whole 256-px image and then cropping costs about 4x on the CPU.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

READER = "reader"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (crop_pos_x, crop_pos_y) of the four corners and the centre; tencrop adds their mirror images
FIVE_CROPS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))

# nvJPEG buffers, sized for 256-px images; DALI's docs recommend preallocating to avoid regrowth
GPU_DECODER_ARGS = dict(hw_decoder_load=0.65, device_memory_padding=64 << 20, host_memory_padding=64 << 20,
                        preallocate_width_hint=1024, preallocate_height_hint=1024)


def read_shards(tars, indexes, *, with_meta: bool, shuffle: bool, initial_fill: int, shard_id: int,
                num_shards: int, seed: int):
    """The split's samples: JPEG bytes, class indices (int32) and, for eval, the JSON metadata."""
    ext = ["jpg", "labels"] + (["json"] if with_meta else [])
    dtypes = [types.UINT8, types.INT32] + ([types.UINT8] if with_meta else [])
    return fn.readers.webdataset(
        paths=[str(t) for t in tars], index_paths=[str(i) for i in indexes], ext=ext, dtypes=dtypes,
        missing_component_behavior="error", random_shuffle=shuffle, initial_fill=initial_fill,
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=not shuffle, seed=seed, name=READER)


def decode(jpegs, on_gpu: bool, crop: int | None = None, crop_pos_x=0.5, crop_pos_y=0.5):
    """JPEG -> HWC uint8 RGB; on the GPU with nvJPEG (and the hardware decoder where there is one).

    With ``crop`` only that window is decoded (libjpeg-turbo skips the rest; nvJPEG decodes the ROI):
    the same pixels as decoding the whole image and cropping, for less work.
    """
    args = dict(device="mixed" if on_gpu else "cpu", output_type=types.RGB, **(GPU_DECODER_ARGS if on_gpu else {}))
    if crop is None:
        return fn.decoders.image(jpegs, **args)
    return fn.decoders.image_crop(jpegs, crop=(crop, crop), crop_pos_x=crop_pos_x, crop_pos_y=crop_pos_y, **args)


def normalize(images, crop: int | None, layout: str, dtype, mean, std, crop_pos_x=0.5, crop_pos_y=0.5, mirror=0):
    """(Crop,) flip, then normalise only the cropped pixels, in one fused operator."""
    window = dict(crop=(crop, crop), crop_pos_x=crop_pos_x, crop_pos_y=crop_pos_y) if crop else {}
    return fn.crop_mirror_normalize(
        images, mirror=mirror, dtype=dtype, output_layout="CHW" if layout == "NCHW" else "HWC",
        mean=[255 * m for m in mean], std=[255 * s for s in std], **window)


def tta_crops(images, tta: str, crop: int, layout: str, dtype, mean, std):
    """none: the centre crop; flip: it and its mirror; tencrop: four corners + centre, and mirrors."""
    if tta == "none":
        return normalize(images, crop, layout, dtype, mean, std)
    positions = [(0.5, 0.5)] if tta == "flip" else FIVE_CROPS
    crops = [normalize(images, crop, layout, dtype, mean, std, x, y, mirror)
             for mirror in (0, 1) for x, y in positions]
    return fn.stack(*crops)  # [views, C, H, W] per image


def pad_labels(labels, on_gpu: bool):
    """Ragged class lists -> one dense int32 matrix per batch, -1 where a row is shorter."""
    padded = fn.pad(labels, fill_value=-1, axes=(0,))
    return padded.gpu() if on_gpu else padded


@pipeline_def(enable_conditionals=False)
def train_pipeline(tars, indexes, *, on_gpu, crop, augmentation, layout, dtype, mean, std, initial_fill,
                   shard_id=0, num_shards=1, reader_seed=0):
    """The original augmentation: random 224 crop of the 256-short-side image, random flip, ImageNet norm."""
    jpegs, labels = read_shards(tars, indexes, with_meta=False, shuffle=True, initial_fill=initial_fill,
                                shard_id=shard_id, num_shards=num_shards, seed=reader_seed)
    if augmentation == "random_resized_crop":  # the ImageNet recipe, as a config option
        images = fn.decoders.image_random_crop(
            jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
            random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3), **(GPU_DECODER_ARGS if on_gpu else {}))
        images = fn.resize(images, size=(crop, crop), antialias=True)
    else:
        images = decode(jpegs, on_gpu, crop, fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0)))
    images = normalize(images, None, layout, dtype, mean, std, mirror=fn.random.coin_flip(probability=0.5))
    return images, pad_labels(labels, on_gpu)


def resize_and_crop(jpegs, on_gpu, resize_shorter, tta, crop, layout, dtype, mean, std):
    """Eval/test graph: short side to ``resize_shorter`` (None: already that size), then the TTA crops."""
    if resize_shorter is None and tta == "none":
        return normalize(decode(jpegs, on_gpu, crop), None, layout, dtype, mean, std)
    images = decode(jpegs, on_gpu)
    if resize_shorter is not None:
        images = fn.resize(images, resize_shorter=resize_shorter, antialias=True)
    return tta_crops(images, tta, crop, layout, dtype, mean, std)


@pipeline_def(enable_conditionals=False)
def eval_pipeline(tars, indexes, *, on_gpu, crop, resize_shorter, tta, layout, dtype, mean, std,
                  shard_id=0, num_shards=1):
    """Every sample once, in shard order: (resize short side,) centre crop or test-time crops, normalise."""
    jpegs, labels, meta = read_shards(tars, indexes, with_meta=True, shuffle=False, initial_fill=1,
                                      shard_id=shard_id, num_shards=num_shards, seed=0)
    images = resize_and_crop(jpegs, on_gpu, resize_shorter, tta, crop, layout, dtype, mean, std)
    return images, pad_labels(labels, on_gpu), fn.pad(meta, fill_value=0, axes=(0,))


@pipeline_def(enable_conditionals=False)
def image_file_pipeline(files, *, on_gpu, crop, resize_shorter, tta, layout, dtype, mean, std,
                        shard_id=0, num_shards=1):
    """Stage-1/2 test images: plain JPEG files, the same graph as eval; the label is the file's position."""
    jpegs, position = fn.readers.file(files=[str(f) for f in files], labels=list(range(len(files))),
                                      random_shuffle=False, pad_last_batch=True, shard_id=shard_id,
                                      num_shards=num_shards, name=READER)
    return resize_and_crop(jpegs, on_gpu, resize_shorter, tta, crop, layout, dtype, mean, std), position


@pipeline_def(enable_conditionals=False)
def decode_only_pipeline(tars, indexes, *, on_gpu):
    """The ceiling for every other graph: reading and decoding alone."""
    jpegs, _ = read_shards(tars, indexes, with_meta=False, shuffle=False, initial_fill=1, shard_id=0,
                           num_shards=1, seed=0)
    return decode(jpegs, on_gpu)
