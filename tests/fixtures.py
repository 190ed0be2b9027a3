"""Test fixtures made by the tests themselves: a small Kaggle-layout dataset with every bad case."""
from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms

from common.shard_format import split_shards
from demo.data import generate_demo_data, render_image
from model.metrics import f2_per_image
from preprocessing.resize import resized_size

REPO = Path(__file__).resolve().parent.parent
SIDE = 64  # data.shortest_side of the demo config
SMALL_SHARDS = "data:\n  shard_max_samples: 7\n"  # many shards from the small fixture
FAST_TRAIN = "train:\n  batch_size: 8\n"  # a few steps per epoch on the fixture


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def corrupt_huffman_table(jpeg: bytes) -> bytes:
    """A JPEG whose header parses but whose Huffman table is bogus: it fails only when decoded."""
    at = jpeg.index(b"\xff\xc4") + 5  # marker, length (2), table class/id (1): then 16 counts
    return jpeg[:at] + b"\xff" * 16 + jpeg[at + 16:]


def photo(rng, w=120, h=90) -> Image.Image:
    return render_image(rng, [0, 7], shifted=False).resize((w, h))


def special_images(rng) -> dict[str, tuple[bytes | None, str | None]]:
    """id -> (file bytes or None for 'no file', expected skip reason or None)."""
    rgb = photo(rng)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    good = jpeg_bytes(rgb)
    right_size = jpeg_bytes(photo(rng, 96, SIDE))
    return {
        "gray0000000000000": (jpeg_bytes(rgb.convert("L")), None),
        "cmyk0000000000000": (jpeg_bytes(rgb.convert("CMYK")), None),
        "rgbapng0000000000": (png_bytes(rgb.convert("RGBA")), None),
        "palettepng0000000": (png_bytes(rgb.convert("P")), None),
        "exifrot0000000000": (jpeg_bytes(photo(rng, 120, 80), exif=exif), None),
        "large000000000000": (jpeg_bytes(photo(rng, 1024, 768)), None),
        "resized0000000000": (right_size, None),  # packed byte for byte
        "progressive000000": (jpeg_bytes(photo(rng, 96, SIDE), progressive=True), None),
        "corrupt0000000000": (corrupt_huffman_table(good), "cannot decode"),
        "garbage0000000000": (good[:2] + bytes(rng.integers(0, 256, 3000, dtype=np.uint8)), "not an image"),
        "truncated00000000": (good[: len(good) // 2], "truncated"),
        "zerobyte000000000": (b"", "zero-byte file"),
        "notanimage0000000": (b"this is a text file, not a picture\n" * 20, "not an image"),
        "missing0000000000": (None, "missing file"),
    }


def make_kaggle_fixture(root: Path, n_train: int = 40, n_stage: int = 24, n_tune: int = 20, seed: int = 1):
    """Demo data plus every bad case the shard builder must handle. Returns (layout, expected)."""
    layout = generate_demo_data(root, n_train=n_train, n_stage1=n_stage, n_stage2=n_stage, n_tune=n_tune,
                                seed=seed)
    rng = np.random.default_rng(seed)
    train_dir = layout.original_images / "train"
    comp = layout.competition_data
    expected: dict[tuple[str, str], str] = {}  # (id, split family) -> reason
    rows = []
    for image_id, (data, reason) in special_images(rng).items():
        if data is not None:
            (train_dir / f"{image_id}.jpg").write_bytes(data)
        rows.append([image_id, "verification", "/m/0dm03", "1"])
        if reason:
            expected[(image_id, "train")] = reason
    (train_dir / "negonly0000000000.jpg").write_bytes(jpeg_bytes(photo(rng)))
    rows.append(["negonly0000000000", "verification", "/m/0dm03", "0"])  # verified absent only
    expected[("negonly0000000000", "train")] = "no trainable label"
    (train_dir / "unknowncode000000.jpg").write_bytes(jpeg_bytes(photo(rng)))
    rows.append(["unknowncode000000", "verification", "/m/0dmx0", "1"])  # not trainable
    expected[("unknowncode000000", "train")] = "no trainable label"
    rows.append(["../../etc/passwd", "verification", "/m/0dm03", "1"])
    expected[("../../etc/passwd", "train")] = "bad id"
    with open(comp / "train_human_labels.csv", "a", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerows(rows)
        f.write("malformed000000000,verification,/m/0dm03,1,extra\n")
    # the tuning file: one image missing on disk (as in the real download), one escaping id
    with open(comp / "tuning_labels.csv", "a", newline="") as f:
        f.write("aaaaaaaaaaaaaaaaaaaaaaaa,/m/0dm01 /m/0dm02\n")
        f.write("../x,/m/0dm01\n")
    expected[("aaaaaaaaaaaaaaaaaaaaaaaa", "tune")] = "missing file"
    expected[("../x", "tune")] = "bad id"
    return layout, expected


def write_config(path: Path, layout, shards: Path, extra: str = "", artifacts: Path | None = None,
                 output: Path | None = None) -> Path:
    """A test config: the demo config with the fixture's paths."""
    base = path.parent
    path.write_text(f"""extends: {REPO / 'demo' / 'config.yaml'}
paths:
  original_images: {layout.original_images}
  competition_data: {layout.competition_data}
  shards: {shards}
  artifacts: {artifacts or base / 'artifacts'}
  output: {output or base / 'output'}
{extra}""")
    return path


def shard_samples(cfg, split):
    """id -> (PIL image, sorted class list), read with the webdataset library."""
    out = {}
    for tar in split_shards(cfg.paths.shards, split).tars:
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            out[s["__key__"]] = (Image.open(io.BytesIO(s["jpg"])).convert("RGB"),
                                 np.frombuffer(s["labels"], "<i4").tolist())
    return out


def centre_crop_reference(cfg, image: Image.Image, dy: int = 0, dx: int = 0) -> torch.Tensor:
    """PIL + torchvision: resize short side, normalise, then a centre crop placed as DALI places it.

    DALI (like the shard builder) rounds the resized long side where torchvision's Resize
    truncates it, and DALI rounds the centre window's corner half up where CenterCrop rounds
    half to even: either would shift the window by a pixel, so the reference follows DALI.
    """
    p = cfg.pipeline
    image = image.resize(resized_size(*image.size, cfg.data.shortest_side), Image.Resampling.BILINEAR)
    full = transforms.Compose([transforms.ToTensor(), transforms.Normalize(p.mean, p.std)])(image)
    c = p.crop_size
    y0, x0 = (int(np.floor((n - c) / 2 + 0.5)) for n in full.shape[1:])
    y0, x0 = y0 + dy, x0 + dx  # (dy, dx): a window shifted from the centre, to test placement
    return full[:, y0:y0 + c, x0:x0 + c]


def mean_f2(predicted: list[list[int]], targets: list[list[int]]) -> float:
    """The metric's mean over images (the project itself needs only the per-image values)."""
    return float(f2_per_image(predicted, targets).mean()) if targets else 0.0


def break_image_in_place(tar_path: Path) -> str:
    """Give the first image of a shard a bogus Huffman table without moving a byte of the tar; returns its key."""
    import tarfile

    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        data = tar.extractfile(member).read()
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(corrupt_huffman_table(data))
    return member.name[: -len(".jpg")]


def resize(folder: Path, size: str) -> None:
    """Grow (or shrink) a tmpfs mounted by the ``tmpfs`` fixture."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def run_main(main, args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command run in-process through its frame."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def pipes(cfg, device=None, amp_dtype=None):
    """The loaders' settings for ``cfg``, on the CPU unless ``device`` says otherwise."""
    from common.device import resolve_device
    from dali_pipes.settings import PipeSettings
    return PipeSettings.from_config(cfg, device=device or resolve_device("cpu"), amp_dtype=amp_dtype)


def split(cfg, name: str):
    return split_shards(cfg.paths.shards, name)


def to_input(cfg):
    """The model's input from a loader's images, as every command makes it."""
    from common.runtime import InputAdapter
    return InputAdapter.from_config(cfg)


def cpu_runtime(cfg):
    """A command's runtime on the CPU, alone (no process group to leave)."""
    from common.device import resolve_device
    from common.distributed import Dist
    from common.runtime import Runtime
    return Runtime(resolve_device("cpu"), Dist(), None, pipes(cfg).threads, to_input(cfg), cfg.pipeline.num_threads)
