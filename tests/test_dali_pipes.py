import io
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.shard_format import ShardWriter, SplitShards, encode_sample
from benchmarks.baseline import baseline_loader
from common.device import resolve_device
from dali_pipes.loader import ImageFileLoader, eval_loader, multi_hot, train_loader
from benchmarks.photos import photo_jpegs
from tests.fixtures import centre_crop_reference, jpeg_bytes, pipes, shard_samples, split, to_input

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")


def rows(targets: torch.Tensor) -> list[tuple]:
    return [tuple(np.flatnonzero(r.numpy()).tolist()) for r in targets]


def test_multi_hot_marks_exactly_the_listed_classes():
    padded = torch.tensor([[3, 0, -1], [2, -1, -1], [4, 1, 2]], dtype=torch.int32)
    out = multi_hot(padded, 5)
    assert out.shape == (3, 5)
    assert rows(out) == [(0, 3), (2,), (1, 2, 4)]


def test_device_choice():
    if not torch.cuda.is_available():
        assert resolve_device("auto").kind == "cpu"
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("gpu")
    assert resolve_device("cpu").device_id is None


@pytest.mark.parametrize("layout, dtype", [("NCHW", "float32"), ("NHWC", "float32"), ("NCHW", "float16"),
                                           ("NCHW", "uint8"), ("NHWC", "uint8")])
def test_train_batches_shapes_dtypes_and_ranges(built, layout, dtype):
    cfg, _ = built
    cfg = cfg.with_overrides([f"model.channels_last={layout == 'NHWC'}", f"pipeline.dtype={dtype}"])
    loader = train_loader(pipes(cfg), split(cfg, "train"), 8)
    images, targets = next(iter(loader))
    c = cfg.pipeline.crop_size
    assert images.shape == ((8, 3, c, c) if layout == "NCHW" and dtype != "uint8" else (8, c, c, 3))
    assert images.dtype == getattr(torch, dtype) and images.device.type == "cpu"
    images = to_input(cfg)(images)
    assert images.shape == (8, 3, c, c) and images.is_floating_point()
    assert images.is_contiguous(memory_format=torch.contiguous_format if layout == "NCHW" else torch.channels_last)
    mean, std = np.array(cfg.pipeline.mean), np.array(cfg.pipeline.std)
    lo, hi = (-mean / std).min(), ((1 - mean) / std).max()
    assert lo - 0.01 <= images.float().min() and images.float().max() <= hi + 0.01
    assert images.float().std() > 0.3  # real pixels, not a constant
    assert targets.shape == (8, 22) and targets.dtype == torch.float32
    assert set(targets.unique().tolist()) <= {0.0, 1.0} and (targets.sum(1) >= 1).all()


def test_eval_covers_every_sample_once_with_its_labels(built):
    cfg, manifest = built
    truth = shard_samples(cfg, "train")
    seen = Counter()
    loader = eval_loader(pipes(cfg), split(cfg, "train"), 5)
    for images, targets, ids in loader:
        assert to_input(cfg)(images).shape[1:] == (3, 56, 56) and len(ids) == len(images) <= 5
        for image_id, row in zip(ids, rows(targets)):
            seen[image_id] += 1
            assert list(row) == truth[image_id][1]
    assert seen == Counter(dict.fromkeys(truth, 1))
    assert len(loader) == -(-len(truth) // 5)


def test_eval_pixels_match_the_torchvision_reference(built):
    """DALI's decode + centre crop against PIL + torchvision on the same images.

    Tolerance: mean absolute difference below 0.005 and maximum below 0.05 in normalised
    units (0.3 and 3 of 255): both decode with libjpeg-turbo, so only float rounding differs.
    """
    cfg, _ = built
    truth = shard_samples(cfg, "val")
    for images, _, ids in eval_loader(pipes(cfg), split(cfg, "val"), 4):
        for image, image_id in zip(to_input(cfg)(images), ids):
            diff = (image - centre_crop_reference(cfg, truth[image_id][0])).abs()
            assert diff.mean() < 0.005 and diff.max() < 0.05, image_id


@pytest.mark.parametrize("tta", ["none", "tencrop"])
def test_uint8_crops_normalised_by_the_consumer_equal_dali_normalisation(built, tta):
    cfg, _ = built
    as_u8 = next(iter(eval_loader(pipes(cfg.with_overrides(["pipeline.dtype=uint8"])), split(cfg, "val"), 4, tta=tta)))[0]
    as_f32 = next(iter(eval_loader(pipes(cfg.with_overrides(["pipeline.dtype=float32"])), split(cfg, "val"), 4, tta=tta)))[0]
    assert as_u8.dtype == torch.uint8 and as_f32.dtype == torch.float32
    assert torch.allclose(to_input(cfg)(as_u8), as_f32, atol=1e-5)


def test_tencrop_views_are_corners_centre_and_their_mirrors(built):
    cfg, _ = built
    images, _, ids = next(iter(eval_loader(pipes(cfg), split(cfg, "val"), 3, tta="tencrop")))
    images = to_input(cfg)(images)
    assert images.shape == (3, 10, 3, 56, 56)
    centre = to_input(cfg)(next(iter(eval_loader(pipes(cfg), split(cfg, "val"), 3)))[0])
    assert torch.allclose(images[:, 4], centre)  # view 4 is the centre crop
    assert torch.allclose(images[:, 5:], images[:, :5].flip(-1))  # views 5..9 mirror views 0..4
    assert not torch.allclose(images[:, 0], images[:, 3])  # corners differ
    flip = to_input(cfg)(next(iter(eval_loader(pipes(cfg), split(cfg, "val"), 3, tta="flip")))[0])
    assert flip.shape == (3, 2, 3, 56, 56) and torch.allclose(flip[:, 1], flip[:, 0].flip(-1))


def test_ranks_read_disjoint_parts_that_cover_the_split(built):
    cfg, _ = built
    parts = []
    for rank in range(2):
        parts.append([i for _, _, ids in eval_loader(pipes(cfg), split(cfg, "train"), 4, rank, 2) for i in ids])
    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(shard_samples(cfg, "train"))
    # training ranks must step in lockstep: each yields the same number of batches, so an odd
    # sample out (at most world_size - 1 per pass) waits for the next pass
    train_parts = [Counter(r for _, t in train_loader(pipes(cfg), split(cfg, "train"), 1, rank, 2) for r in rows(t))
                   for rank in range(2)]
    truth = Counter(tuple(v[1]) for v in shard_samples(cfg, "train").values())
    assert sum(train_parts[0].values()) == sum(train_parts[1].values()) == len(train_loader(pipes(cfg), split(cfg, "train"), 1, 0, 2))
    assert train_parts[0] + train_parts[1] <= truth
    assert sum((train_parts[0] + train_parts[1]).values()) >= sum(truth.values()) - 1


def test_train_epochs_reshuffle_and_the_seed_repeats_them(built):
    cfg, _ = built
    loader = train_loader(pipes(cfg), split(cfg, "train"), 1)
    epoch1 = [r for _, t in loader for r in rows(t)]
    epoch2 = [r for _, t in loader for r in rows(t)]
    truth = Counter(tuple(v[1]) for v in shard_samples(cfg, "train").values())
    assert Counter(epoch1) == Counter(epoch2) == truth  # batch 1: a whole pass, nothing dropped
    assert epoch1 != epoch2
    again = train_loader(pipes(cfg), split(cfg, "train"), 1)
    assert [r for _, t in again for r in rows(t)] == epoch1
    other = train_loader(pipes(cfg.with_overrides(["data.seed=7"])), split(cfg, "train"), 1)
    assert [r for _, t in other for r in rows(t)] != epoch1


def test_train_drops_only_the_last_partial_batch(built):
    cfg, manifest = built
    loader = train_loader(pipes(cfg), split(cfg, "train"), 8)
    sizes = [len(t) for _, t in loader]
    assert sizes == [8] * (manifest["splits"]["train"]["samples"] // 8) and len(loader) == len(sizes)


def test_image_file_loader_resizes_and_keeps_positions(built, tmp_path):
    """Test images of any size: resized in the pipeline. Tolerance: mean absolute difference below
    0.03 in normalised units (2 of 255): DALI's and PIL's antialiased linear filters differ slightly."""
    cfg, _ = built
    files = []
    for k, jpeg in enumerate(photo_jpegs(11, short_side=100, seed=3)):
        files.append(tmp_path / f"{k:024x}.jpg")
        files[-1].write_bytes(jpeg)
    seen = []
    for images, positions in ImageFileLoader(pipes(cfg), files, 4):
        images = to_input(cfg)(images)
        assert images.shape[1:] == (3, 56, 56)
        for image, pos in zip(images, positions.tolist()):
            seen.append(pos)
            diff = (image - centre_crop_reference(cfg, Image.open(files[pos]).convert("RGB"))).abs()
            assert diff.mean() < 0.03, files[pos].name
    assert sorted(seen) == list(range(len(files)))


def test_baseline_loader_yields_the_same_kind_of_batches(built):
    cfg, manifest = built
    n = 0
    for images, targets in baseline_loader(cfg, "val", train=False, batch_size=4, num_workers=0):
        assert images.shape[1:] == (3, 56, 56) and targets.shape[1] == 22
        n += len(images)
    assert n == manifest["splits"]["val"]["samples"]


@needs_gpu
def test_gpu_pipelines_deliver_on_the_device_and_match_the_cpu(built):
    """Like with like: the GPU's float16 batches and the CPU's uint8 ones, both through the input adapter."""
    cfg, _ = built
    gpu, cpu = resolve_device("gpu"), resolve_device("cpu")
    images, targets = next(iter(train_loader(pipes(cfg, gpu, torch.bfloat16), split(cfg, "train"), 8)))
    assert images.is_cuda and targets.is_cuda and images.dtype == torch.float16
    g = next(iter(eval_loader(pipes(cfg, gpu, torch.bfloat16), split(cfg, "val"), 4)))
    c = next(iter(eval_loader(pipes(cfg, cpu), split(cfg, "val"), 4)))
    assert g[2] == c[2] and torch.equal(g[1].cpu(), c[1])
    diff = (to_input(cfg)(g[0]).float().cpu() - to_input(cfg)(c[0])).abs()
    assert diff.shape == (4, 3, 56, 56) and diff.mean() < 0.03


def gradient_shards(folder, count: int, width: int = 96, height: int = 64):
    """Shards of images whose red channel encodes x and green encodes y, so a crop tells where it was
    taken and whether it was mirrored. Returns (SplitShards, the decoded images by id)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    writer = ShardWriter(folder, "grad", 0)
    decoded = {}
    for k in range(count):
        jpeg = jpeg_bytes(Image.fromarray(pixels))
        key = f"{k:016x}"
        writer.add(encode_sample(key, jpeg, np.array([k % 22]), []))
        decoded[key] = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    record = writer.close()
    return SplitShards([folder / record.name], [folder / record.index], count, height, 22), decoded


def crop_origin(crop: np.ndarray, width: int, height: int) -> tuple[int, int, bool]:
    """(x0, y0, mirrored) of a crop of a gradient image."""
    first, last = crop[:, 0, 0].mean(), crop[:, -1, 0].mean()
    mirrored = first > last
    x0 = round(min(first, last) * (width - 1) / 255)
    y0 = round(crop[0, :, 1].mean() * (height - 1) / 255)
    return x0, y0, mirrored


def test_train_crops_are_random_windows_of_the_right_size_and_half_are_mirrored(built, tmp_path):
    cfg, _ = built
    cfg = cfg.with_overrides(["pipeline.dtype=uint8"])
    c = cfg.pipeline.crop_size
    shards, decoded = gradient_shards(tmp_path, 64)
    reference = next(iter(decoded.values()))
    origins, mirrored = Counter(), 0
    loader = train_loader(pipes(cfg), shards, 16)
    for _ in range(3):
        for images, _ in loader:
            assert images.shape == (16, c, c, 3) and images.dtype == torch.uint8
            for crop in images.numpy().astype(int):
                x0, y0, flip = crop_origin(crop, 96, 64)
                assert 0 <= x0 <= 96 - c and 0 <= y0 <= 64 - c
                window = reference[y0:y0 + c, x0:x0 + c]
                assert np.abs((window[:, ::-1] if flip else window) - crop).mean() < 2  # that very window
                origins[(x0, y0)] += 1
                mirrored += flip
    total = sum(origins.values())
    assert total == 3 * 64
    assert len({x for x, _ in origins}) >= 12 and len({y for _, y in origins}) >= 5  # positions vary in x and y
    assert 0.35 < mirrored / total < 0.65


@pytest.mark.parametrize("ranks", [1, 2])
def test_every_epoch_reads_the_tars_in_a_new_order_and_each_sample_once_across_ranks(tmp_path, ranks):
    """The shards are shuffled once, at build time: with a small buffer and no new order of the tars each epoch,
    every epoch would be read in nearly the order of the one before."""
    from benchmarks.order_freshness import freshness, positions, write_shards
    tars, indexes = write_shards(tmp_path, 1920, 40)
    epochs = positions(tars, indexes, 1920, ranks, epochs=3, buffer=4, shard_order=True)
    assert [sorted(e) for e in epochs] == [list(range(1920))] * 3  # each sample once per epoch, over the ranks
    assert freshness(epochs)["max_abs_rho"] < 0.6
    old = positions(tars, indexes, 1920, ranks, epochs=2, buffer=4, shard_order=False)
    assert freshness(old)["max_abs_rho"] > 0.9  # what the test guards against: the buffer alone


def test_the_train_graph_makes_each_scheduled_side_and_passes_its_state_from_one_side_to_the_next(built):
    """A resolution schedule's epochs: the same window (pipeline.crop_size) resized to each side, in the handed-over
    form of each dtype; a pipeline of another side built from a checkpoint goes on with the very samples the first
    one would have read next."""
    cfg, _ = built
    train, window = split(cfg, "train"), cfg.pipeline.crop_size
    for dtype in ("uint8", "float32"):
        settings = pipes(cfg.with_overrides([f"pipeline.dtype={dtype}"]))
        for side in (40, 48, window):
            images, _ = next(iter(train_loader(settings, train, 4, size=side)))
            assert images.shape == ((4, side, side, 3) if dtype == "uint8" else (4, 3, side, side))
            assert to_input(cfg)(images).shape == (4, 3, side, side)
    first = train_loader(pipes(cfg), train, 4, size=40)
    stream = first.stream()
    for _ in range(3):
        next(stream)
    other = train_loader(pipes(cfg), train, 4, size=48, checkpoint=first.checkpoint())
    assert other.size == 48
    went_on = [rows(next(stream)[1]) for _ in range(4)]
    assert [rows(t) for _, t in islice(other.stream(), 4)] == went_on


def test_the_preview_shows_a_row_per_scheduled_side_then_the_eval_views(built, kaggle, tmp_path, capsys):
    from common.config import load_config
    from dali_pipes.preview import LABEL_LINES, LINE, PAD, main as preview_main, preview_rows
    from tests.fixtures import run_main, write_config
    cfg, _ = built
    path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, """train:
  epochs: 4
  resolution: {start: 40, end: 56, start_epoch: 1, end_epoch: 3, step: 8}
tune:
  test_resolutions: [[64, 56], [80, 72]]
""")
    out = tmp_path / "look" / "batch.png"
    code, _, err = run_main(preview_main, ["--config", str(path), "--out", str(out), "--images", "4"], capsys)
    assert code == 0, err
    rows = preview_rows(load_config(path), 4)
    assert [r.title for r in rows][:3] == ["train 40 px (epochs 1-2)", "train 48 px (epochs 3-3)",
                                          "train 56 px (epochs 4-4)"]
    assert [r.title.split(" of ")[0] for r in rows[3:]] == ["ten-crop", "test 64/56", "test 80/72"]
    assert [{c.shape[:2] for c in r.crops} for r in rows] == [{(40, 40)}, {(48, 48)}, {(56, 56)}, {(56, 56)},
                                                              {(56, 56)}, {(72, 72)}]
    assert [len(r.crops) for r in rows] == [4, 4, 4, 10, 4, 4] and all(r.captions[0] for r in rows)
    picture = Image.open(out)  # a grid of the six rows, cells of the largest crop
    assert picture.size == (PAD + 10 * (72 + PAD), PAD + 6 * (LINE + 72 + LABEL_LINES * LINE + PAD))
