#!/usr/bin/env python3
"""Every GPU path of the project in one run, each figure with a rule that can fail, and a JSON report.

    python scripts/gpu_check.py --json gpu_check.json                  # on a GPU machine: about 8 minutes
    python scripts/gpu_check.py --rehearse --json rehearsal.json       # the same parts on the CPU
    python scripts/gpu_check.py --only parity,resume --json part.json  # some parts only

The parts, each a list of gates (name, measured value, rule, passed):
  parity          every GPU graph against its CPU graph on the same data: eval with and without resize, every
                  predict.tta, the test-image graph on full-size originals, every output dtype, the train graph
                  with the same seed; batch and image counts first, then ids, labels (also against the shards
                  themselves), the mean and the worst batch's 99.9th percentile of the pixel difference, and the
                  ten-crop order on every batch
  throughput      the decode-only ceiling, the train and eval loaders (images/s over timed windows of at least 2 s,
                  median of 3 or more); the train loader must deliver 1.5x the model's own training steps
  training_steps  the model's steps fed by the DALI train loader against the same steps on one batch kept on the
                  device: the share of step time spent waiting for data (GPU: SE-ResNet101, bf16, channels-last);
                  memory as the driver sees the process (DALI's pools included) beside torch's own figure
  ddp             training under torchrun: a real process group (NCCL on GPUs, gloo on the CPU) with the DDP
                  wrapper, all-gather, all-reduce and barrier; two processes where two GPUs (or the CPU) allow
  compile         model.compile: true trains, saves, resumes into a new process and submits
  resume          a run killed with SIGKILL after a mid-epoch checkpoint and resumed, against the same run
                  uninterrupted (GPU: fp16 with its GradScaler); the tolerance is what a second uninterrupted
                  run differs by (bitwise on the CPU)
  commands        the README's commands on demo data: build, train, tune, stage-2 submission; the train run's
                  validation GAP must clear a floor no image-blind model reaches

Report: {"passed", "rehearsal", "device", "parts": {NAME: {"passed", "gates": [...], ...}}}, written after every
part. Exit 0 when every gate passed, 1 when one failed (or a part broke), 2 when the check cannot run here.
--rehearse runs on the CPU (gloo, the CPU graphs against the other output dtypes, timm's test_resnet, small data)
with thresholds stated for the CPU; --quick makes it small enough for the test suite (windows of 0.5 s,
torch.compile with its eager backend). --fault puts a known bug into the run, to see the gate that notices it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import timing  # noqa: E402  (scripts/timing.py)

PARTS = ("parity", "throughput", "training_steps", "ddp", "compile", "resume", "commands")
FAULTS = ("slow-loader", "ignore-dali-checkpoint", "shuffled-labels")


# ---------------------------------------------------------------------------------------------------- gates

@dataclass
class Gate:
    name: str
    value: Any
    rule: str
    passed: bool


def at_least(name: str, value: float, floor: float) -> Gate:
    return Gate(name, _round(value), f">= {_round(floor)}", bool(value >= floor))


def at_most(name: str, value: float, ceiling: float) -> Gate:
    return Gate(name, _round(value), f"<= {_round(ceiling)}", bool(value <= ceiling))


def equal(name: str, value: Any, expected: Any) -> Gate:
    return Gate(name, value, f"== {expected}", bool(value == expected))


def _round(x):
    return round(float(x), 6) if isinstance(x, (float, np.floating)) else x


@dataclass
class Batch:
    """One loader batch brought to the CPU: the model's input as float (``[B, (V,) C, H, W]``), the multi-hot
    targets (or positions for test images) and the image ids (None where the loader has none)."""
    images: torch.Tensor
    labels: torch.Tensor
    ids: list | None


def batch_parity(name: str, device: list[Batch], reference: list[Batch], mean_tol: float, p999_tol: float) -> list[Gate]:
    """The device graph's batches against the reference graph's: counts before pixels (a short list must not
    compare equal over its common prefix), then ids and labels, then pixels: the mean absolute difference over
    everything and, so that one bad batch among many cannot hide in an average, the worst batch's mean and its
    99.9th percentile."""
    gates = [equal(f"{name}: batches", len(device), len(reference)),
             equal(f"{name}: images", sum(len(b.images) for b in device), sum(len(b.images) for b in reference))]
    if not all(g.passed for g in gates):
        return gates
    shapes = all(d.images.shape == r.images.shape for d, r in zip(device, reference))
    gates.append(equal(f"{name}: shapes equal", shapes, True))
    gates.append(equal(f"{name}: ids equal", all(d.ids == r.ids for d, r in zip(device, reference)), True))
    gates.append(equal(f"{name}: labels equal",
                       all(torch.equal(d.labels, r.labels) for d, r in zip(device, reference)), True))
    if not shapes:
        return gates
    total, count, worst_mean, worst_p999 = 0.0, 0, 0.0, 0.0
    for d, r in zip(device, reference):
        diff = (d.images.float() - r.images.float()).abs().flatten().numpy()
        total += float(diff.sum(dtype=np.float64))
        count += diff.size
        worst_mean = max(worst_mean, float(diff.mean()))
        k = min(diff.size - 1, int(math.ceil(0.999 * diff.size)) - 1)
        worst_p999 = max(worst_p999, float(np.partition(diff, k)[k]))
    gates += [at_most(f"{name}: mean abs diff", total / max(count, 1), mean_tol),
              at_most(f"{name}: worst batch mean abs diff", worst_mean, 2 * mean_tol),
              at_most(f"{name}: worst batch p99.9 abs diff", worst_p999, p999_tol)]
    return gates


def tencrop_order(name: str, batches: list[Batch], centre: list[Batch] | None = None, tol: float = 1e-3) -> list[Gate]:
    """Views 5..9 mirror views 0..4 on every batch, and view 4 is the plain centre crop (``centre``: the same
    images through tta none), as the model's view averaging and the tests assume."""
    mirrored = sum(bool((b.images[:, 5:] - b.images[:, :5].flip(-1)).abs().max() <= tol) for b in batches)
    gates = [equal(f"{name}: batches whose views 5-9 mirror 0-4", mirrored, len(batches))]
    if centre is not None:
        same = len(centre) == len(batches) and all(
            c.images.shape == b.images[:, 4].shape and bool((b.images[:, 4] - c.images).abs().max() <= tol)
            for b, c in zip(batches, centre))
        gates.append(equal(f"{name}: view 4 is the centre crop", same, True))
    return gates


def labels_match_truth(name: str, batches: list[Batch], truth: dict[str, list[int]]) -> Gate:
    """Each image's targets are the classes its shard sample holds (read from the tar, not through DALI):
    catches labels handed over with the wrong images."""
    checked = wrong = 0
    for b in batches:
        for image_id, row in zip(b.ids, b.labels):
            checked += 1
            wrong += torch.nonzero(row).flatten().tolist() != truth.get(image_id)
    return Gate(f"{name}: images whose labels are their shard sample's", f"{checked - wrong} of {checked}",
                f"all of {len(truth)}", checked == len(truth) and wrong == 0)


def loader_keeps_up(loader_rate: float, step_rate: float, min_ratio: float = 1.5) -> Gate:
    """The train loader's images/s against the model's training steps' (on a batch kept on the device)."""
    return at_least("train loader / model training steps (images/s)", loader_rate / step_rate, min_ratio)


def data_wait_share(fed_rate: float, synthetic_rate: float) -> float:
    """The share of a fed step's time spent waiting for data: 1 - fed/synthetic, as measured (noise can make it
    negative; it is recorded so, not clipped)."""
    return 1.0 - fed_rate / synthetic_rate


def data_wait(fed_rate: float, synthetic_rate: float, max_share: float) -> Gate:
    return at_most("share of step time waiting for data", data_wait_share(fed_rate, synthetic_rate), max_share)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every floating-point tensor of two state dicts (inf when the keys differ)."""
    if a.keys() != b.keys():
        return math.inf
    num = den = 0.0
    for k in b:
        if b[k].is_floating_point():
            num += float((a[k].double() - b[k].double()).pow(2).sum())
            den += float(b[k].double().pow(2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def weights_match(resumed: dict, clean: dict, clean_again: dict, floor: float) -> Gate:
    """The resumed run's weights against the uninterrupted run's, within what a second uninterrupted run differs
    by (twice it, or ``floor``): bitwise where the device is deterministic (the CPU), measured where it is not."""
    noise = relative_difference(clean_again, clean)
    tolerance = max(2 * noise, floor)
    return Gate("weights: resumed vs uninterrupted (relative L2)", _round(relative_difference(resumed, clean)),
                f"<= {_round(tolerance)} (2 x a second uninterrupted run's {_round(noise)}, at least {floor})",
                relative_difference(resumed, clean) <= tolerance)


# ----------------------------------------------------------------------------------------------- profiles

@dataclass(frozen=True)
class Profile:
    """What a run of the check uses, and its thresholds."""
    rehearsal: bool
    device: str  # pipeline.device
    model: str  # the training_steps part's model
    batch_size: int  # throughput and training_steps
    photos: int  # photographs for the parity and throughput shards
    test_images: int  # full-size originals for the test-image graph
    demo_train: int  # demo images for the training parts
    window_s: float
    windows: int
    parity_mean: float  # normalised pixel units (1 level of 0..255 is about 0.017)
    parity_p999: float
    max_wait_share: float
    resume_floor: float  # the resume tolerance's floor (relative L2)
    gap_margin: float  # the commands part's GAP must beat the best image-blind predictor by this much
    max_spread: float | None  # a timed figure's windows may differ by this factor at most (None: not gated)
    quick: bool = False


# nvJPEG and libjpeg-turbo round their IDCTs differently (with the same chroma upsampling): a level or two on a few
# pixels, 0.03 in the mean, 15 levels at the 99.9th percentile of the worst batch
GPU = Profile(rehearsal=False, device="gpu", model="seresnet101", batch_size=128, photos=2000, test_images=64,
              demo_train=1200, window_s=2.0, windows=3, parity_mean=0.03, parity_p999=0.25, max_wait_share=0.05,
              resume_floor=1e-4, gap_margin=0.05, max_spread=1.25)
# on the CPU both sides decode with libjpeg-turbo: the only difference is float16 rounding (half a step at 2.6,
# 0.001); the CPU's cores are shared by DALI's threads and the model's, so a fed step waits for data more
REHEARSAL = Profile(rehearsal=True, device="cpu", model="test_resnet", batch_size=32, photos=600, test_images=24,
                    demo_train=600, window_s=2.0, windows=3, parity_mean=0.002, parity_p999=0.005,
                    max_wait_share=0.15, resume_floor=0.0, gap_margin=0.05, max_spread=1.5)
# the test suite's form: the parts' wiring and their gates, on windows too short to gate their spread
QUICK = replace(REHEARSAL, photos=200, test_images=8, demo_train=240, window_s=0.5, max_spread=None, quick=True)


# ----------------------------------------------------------------------------------------------- timing

def interleaved(streams: dict, batch_size: int, profile: Profile) -> dict:
    """``timing.interleaved`` with the profile's windows."""
    return timing.interleaved(streams, batch_size, profile.window_s, profile.windows)


def timed_windows(batches: Iterator, batch_size: int, profile: Profile, step: Callable | None = None) -> dict:
    return timing.timed_windows(batches, batch_size, profile.window_s, profile.windows, step)


def steady(name: str, figure: dict, profile: Profile) -> list[Gate]:
    """A figure whose windows disagree this much was taken on a busy machine: say so rather than trust it."""
    if profile.max_spread is None:
        return []
    return [at_most(f"{name}: window spread (max / min images/s)", figure["spread"], profile.max_spread)]


def gpu_memory() -> dict:
    """Memory as the driver sees this process (DALI's pools and cuDNN's workspaces included) beside torch's own
    peak; on the CPU, the process's peak resident memory."""
    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return out
    out["torch_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    out["torch_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout
        mine = [int(mem) for pid, mem in (line.split(",") for line in text.splitlines() if "," in line)
                if int(pid) == os.getpid()]
    except (OSError, subprocess.SubprocessError, ValueError):
        mine = []
    if mine:
        out["driver_process_gib"] = round(mine[0] / 1024, 2)
    else:  # in a container the driver lists host pids: the whole device's use instead
        free, total = torch.cuda.mem_get_info()
        out["driver_device_used_gib"] = round((total - free) / 2 ** 30, 2)
    return out


class JpegEngineWatch:
    """Whether the hardware JPEG decoder (NVJPG) worked while the block ran, from ``nvidia-smi dmon``'s jpg
    utilisation column (drivers that have one); None when it cannot be told."""

    def __init__(self, index: int):
        self.index, self.proc, self.result = index, None, {"hardware_decoder_used": None}

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-i", str(self.index)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            self.result["why"] = "no nvidia-smi"
            return
        self.proc.terminate()
        text = self.proc.communicate(timeout=30)[0]
        header = next((line.lstrip("#").split() for line in text.splitlines() if line.startswith("# gpu")), [])
        if "jpg" not in header:
            self.result["why"] = "nvidia-smi dmon reports no jpg column on this driver"
            return
        col = header.index("jpg")
        values = [int(v[col]) for v in (line.split() for line in text.splitlines() if line and line[0] != "#")
                  if len(v) > col and v[col].isdigit()]
        self.result = {"hardware_decoder_used": bool(values) and max(values) > 0,
                       "max_jpg_utilisation_percent": max(values, default=None)}


# ------------------------------------------------------------------------------------------------ context

class Check:
    """The data, configs and measurements the parts share; everything under one work folder."""

    def __init__(self, profile: Profile, work: Path, fault: str | None):
        self.profile, self.work, self.fault = profile, work, fault
        from dali_pipes.device import resolve_device
        from model.network import autocast_dtype
        self.device = resolve_device(profile.device)
        self.amp_dtype = autocast_dtype(self.device.kind == "gpu", True)

    # --- data
    @cached_property
    def photo_shards(self) -> Path:
        from benchmark_throughput import make_shards
        return make_shards(self.work / "photos", self.profile.photos)

    @cached_property
    def test_images(self) -> list[Path]:
        """Full-size originals (1024 px on the long side), as the stage-1/2 test folders hold them."""
        from demo.photos import photo_jpegs
        folder = self.work / "test_images"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for k, jpeg in enumerate(photo_jpegs(self.profile.test_images, long_side=1024, seed=7)):
            files.append(folder / f"{k:016x}.jpg")
            files[-1].write_bytes(jpeg)
        return files

    def photo_config(self, *overrides: str):
        from common.config import load_config
        return load_config(REPO / "config.yaml", [f"paths.shards={self.photo_shards}", "model.channels_last=true",
                                                  f"pipeline.device={self.profile.device}", *overrides])

    @cached_property
    def demo(self):
        from common.config import load_config
        from demo.data import generate_demo_data
        from preprocessing.build_shards import build_shards
        layout = generate_demo_data(self.work / "demo", n_train=self.profile.demo_train, n_stage1=80, n_stage2=120,
                                    n_tune=60)
        build_shards(load_config(self.demo_config("demo_build")), workers=min(4, os.cpu_count() or 1))
        return layout

    def demo_config(self, name: str, changes: dict | None = None, fresh: bool = True) -> Path:
        """A config file for one training part: the demo config on the check's demo data, its own artifacts
        (``fresh``: none left from an earlier check in the same --work folder)."""
        import yaml
        from common.atomic import atomic_write_text
        work = self.work
        if fresh:
            shutil.rmtree(work / name, ignore_errors=True)
        values = {"extends": str(REPO / "demo" / "config.yaml"),
                  "paths": {"original_images": str(work / "demo" / "original_images"),
                            "competition_data": str(work / "demo" / "inclusive"),
                            "shards": str(work / "demo_shards"), "artifacts": str(work / name / "artifacts"),
                            "output": str(work / name / "output")},
                  "pipeline": {"device": self.profile.device}}
        if not self.profile.rehearsal:  # the GPU's habits: channels-last, bigger batches
            values.update(model={"channels_last": True}, train={"batch_size": 64})
        for section, keys in (changes or {}).items():
            values.setdefault(section, {}).update(keys)
        path = work / name / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
        return path

    # --- the model's own training steps, measured once and shared by throughput and training_steps
    @cached_property
    def steps(self) -> dict:
        from dali_pipes.loader import prepare_input, train_loader
        from model.network import create_model
        from training.losses import per_positive_softmax_loss
        from training.train import training_step
        from common.shard_format import split_shards
        cfg = self.photo_config()
        shards = split_shards(self.photo_shards, "train")
        dev = self.device.torch_device
        if self.device.kind == "gpu":
            torch.backends.cudnn.benchmark = True
        model = create_model(self.profile.model, shards.num_classes, channels_last=True).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        def step(batch):
            training_step(model, opt, scaler, per_positive_softmax_loss, prepare_input(batch[0], cfg), batch[1],
                          self.amp_dtype)
        loader = train_loader(cfg, batch_size=self.profile.batch_size, device=self.device, shards=shards,
                              amp_dtype=self.amp_dtype)
        stream = loader.stream()  # one stream for the run: a second iter() would restart DALI mid-epoch
        images, targets = next(stream)
        kept = (images.clone(), targets.clone())

        def one_batch():
            while True:
                yield kept
        return {"step": step, "stream": stream, "one_batch": one_batch()}


def part_result(gates: list[Gate], **figures) -> dict:
    return {"passed": all(g.passed for g in gates), "gates": [asdict(g) for g in gates], **figures}


# --------------------------------------------------------------------------------------------------- parts

def collect(batches, cfg, with_ids: bool = True, limit: int | None = None) -> list[Batch]:
    from dali_pipes.loader import prepare_input
    out = []
    for k, batch in enumerate(batches):
        if limit is not None and k >= limit:
            break
        images = prepare_input(batch[0], cfg).float().cpu()
        out.append(Batch(images, batch[1].cpu(), list(batch[2]) if with_ids and len(batch) > 2 else None))
    return out


def shard_truth(shards) -> dict[str, list[int]]:
    from common.shard_format import decode_labels, decode_meta, iter_samples
    truth = {}
    for tar in shards.tars:
        for _, files in iter_samples(tar):
            truth[decode_meta(files["json"])["image_id"]] = sorted(int(c) for c in decode_labels(files["labels"]))
    return truth


def parity(check: Check) -> dict:
    from common.shard_format import split_shards
    from dali_pipes.device import resolve_device
    from dali_pipes.loader import ImageFileLoader, eval_loader, train_loader
    p = check.profile
    cpu = resolve_device("cpu")
    val = split_shards(check.photo_shards, "val")
    train = split_shards(check.photo_shards, "train")
    truth = shard_truth(val)
    reference_cfg = check.photo_config("pipeline.dtype=uint8")
    gates, centre = [], {}
    # (name, overrides, tta): every output dtype; every tta with and without the eval resize
    cases = [(f"eval {dtype}", [f"pipeline.dtype={dtype}"], "none") for dtype in ("float32", "uint8")]
    cases += [(f"eval float16 tta={tta}{' resized' if resize else ''}",
               ["pipeline.dtype=float16"] + (["data.shortest_side=288"] if resize else []), tta)
              for resize in (False, True) for tta in ("none", "flip", "tencrop")]
    for name, overrides, tta in cases:
        dev_cfg = check.photo_config(*overrides)
        ref_cfg = reference_cfg.with_overrides(overrides[1:])
        dev = collect(eval_loader(dev_cfg, batch_size=16, device=check.device, tta=tta, shards=val,
                                  amp_dtype=check.amp_dtype), dev_cfg)
        ref = collect(eval_loader(ref_cfg, batch_size=16, device=cpu, tta=tta, shards=val), ref_cfg)
        gates += batch_parity(name, dev, ref, p.parity_mean, p.parity_p999)
        gates.append(labels_match_truth(name, dev, truth))
        if tta == "none":
            centre[bool(overrides[1:])] = dev
        if tta == "tencrop":
            gates += tencrop_order(name, dev, centre.get(bool(overrides[1:])))
    # the test-image graph: full-size originals, resized with antialiasing, centre crop and ten crops
    for tta in ("none", "tencrop"):
        dev_cfg = check.photo_config("pipeline.dtype=float16")
        dev = collect(ImageFileLoader(dev_cfg, check.test_images, tta=tta, batch_size=8, device=check.device,
                                      amp_dtype=check.amp_dtype), dev_cfg, with_ids=False)
        ref = collect(ImageFileLoader(reference_cfg, check.test_images, tta=tta, batch_size=8, device=cpu),
                      reference_cfg, with_ids=False)
        gates += batch_parity(f"test images tta={tta}", dev, ref, p.parity_mean, p.parity_p999)
    # the train graph: its random windows and flips are drawn on the CPU from the same seed on either device
    dev_cfg = check.photo_config("pipeline.dtype=float16")
    batches = 4
    dev = collect(train_loader(dev_cfg, batch_size=16, device=check.device, shards=train, amp_dtype=check.amp_dtype),
                  dev_cfg, with_ids=False, limit=batches)
    ref = collect(train_loader(reference_cfg, batch_size=16, device=cpu, shards=train), reference_cfg,
                  with_ids=False, limit=batches)
    gates += batch_parity("train float16 (same seed)", dev, ref, p.parity_mean, p.parity_p999)
    return part_result(gates, compared_images=len(truth), test_images=len(check.test_images))


def throughput(check: Check) -> dict:
    from common.shard_format import split_shards
    from dali_pipes.loader import eval_loader, pipeline_threads, train_loader
    from dali_pipes.pipelines import decode_only_pipeline
    p, bs = check.profile, check.profile.batch_size
    cfg = check.photo_config()
    shards = split_shards(check.photo_shards, "train")
    ceiling = decode_only_pipeline(shards.tars, shards.indexes, on_gpu=check.device.kind == "gpu", batch_size=bs,
                                   num_threads=pipeline_threads(cfg.pipeline.num_threads, check.device.kind == "gpu"),
                                   device_id=check.device.device_id,
                                   prefetch_queue_depth=cfg.pipeline.prefetch_queue_depth)
    ceiling.build()

    def runs(pipe):
        while True:
            yield pipe.run()
    figures = {}
    if check.device.kind == "gpu":
        with JpegEngineWatch(check.device.device_id) as watch:
            figures["decode_ceiling"] = timed_windows(runs(ceiling), bs, p)
        figures["nvjpeg"] = watch.result
    else:
        figures["decode_ceiling"] = timed_windows(runs(ceiling), bs, p)
    del ceiling
    figures["eval_loader"] = timed_windows(eval_loader(cfg, "train", batch_size=bs, device=check.device,
                                                       shards=shards, amp_dtype=check.amp_dtype).stream(), bs, p)
    # the loader against the model's own steps on one batch kept on the device, windows in turn
    train = train_loader(cfg, batch_size=bs, device=check.device, shards=shards, amp_dtype=check.amp_dtype)
    steps = check.steps
    both = interleaved({"train_loader": (train.stream(), None),
                        "model_training_steps": (steps["one_batch"], steps["step"])}, bs, p)
    figures.update(train_loader=both["train_loader"], model_training_steps=both["model_training_steps"])
    gates = [loader_keeps_up(both["ratios"]["train_loader"]["model_training_steps"], 1.0)]
    for name in ("decode_ceiling", "eval_loader", "train_loader", "model_training_steps"):
        gates += steady(name, figures[name], p)
    return part_result(gates, model=p.model, batch_size=bs, **figures)


def training_steps(check: Check) -> dict:
    """The model's steps fed by the DALI train loader against the same steps on one batch kept on the device,
    windows in turn; the waiting share is 1 - the median of the paired ratios."""
    steps, p = check.steps, check.profile
    both = interleaved({"dali_fed": (steps["stream"], steps["step"]),
                        "one_batch_on_device": (steps["one_batch"], steps["step"])}, p.batch_size, p)
    share = data_wait_share(both["ratios"]["dali_fed"]["one_batch_on_device"], 1.0)
    gates = [data_wait(both["ratios"]["dali_fed"]["one_batch_on_device"], 1.0, p.max_wait_share),
             *steady("dali_fed", both["dali_fed"], p), *steady("one_batch_on_device", both["one_batch_on_device"], p)]
    return part_result(gates, model=p.model, batch_size=p.batch_size,
                       autocast=str(check.amp_dtype).removeprefix("torch.") if check.amp_dtype else None,
                       channels_last=True, dali_fed=both["dali_fed"], one_batch_on_device=both["one_batch_on_device"],
                       data_wait_share=round(share, 4), memory=gpu_memory())


def child_command(check: Check, *args: str) -> list[str]:
    """This script as a training process, carrying the check's fault and compile backend (see ``child``)."""
    return [sys.executable, str(Path(__file__).resolve()), "_train", *args]


def child_env(check: Check) -> dict:
    env = {**os.environ, "GPU_CHECK_FAULT": check.fault or ""}
    if check.profile.quick:
        env["GPU_CHECK_EAGER_COMPILE"] = "1"
    return env


def run_child(check: Check, args: list[str], log_name: str) -> subprocess.CompletedProcess:
    r = subprocess.run(child_command(check, *args), cwd=REPO, capture_output=True, text=True, env=child_env(check),
                       timeout=1800)
    (check.work / f"{log_name}.log").write_text(r.stdout + r.stderr)
    return r


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def ddp(check: Check) -> dict:
    from common.shard_format import read_manifest
    check.demo  # noqa: B018 (builds the data)
    n = 2 if check.device.kind == "cpu" or torch.cuda.device_count() >= 2 else 1
    config = check.demo_config("ddp", {"train": {"epochs": 2}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(Path(__file__).resolve()), "_train", "--config", str(config), "--stage", "train"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=child_env(check), timeout=1800)
    (check.work / "ddp.log").write_text(r.stdout + r.stderr)
    epochs = [e for e in records(check.work / "ddp" / "artifacts" / "train" / "metrics.jsonl") if "val_gap" in e]
    val = read_manifest(check.work / "demo_shards")["splits"]["val"]["samples"]
    backend = "nccl" if check.device.kind == "gpu" else "gloo"
    gates = [equal("exit code", r.returncode, 0), equal("epochs recorded", len(epochs), 2)]
    for e in epochs:
        tag = f"epoch {e['epoch']}"
        gates += [equal(f"{tag}: process group", e.get("process_group"), backend),
                  equal(f"{tag}: processes", len(e["rank_param_checksums"]), n),
                  equal(f"{tag}: distinct weight-and-BatchNorm checksums over the ranks",
                        len(set(e["rank_param_checksums"])), 1),
                  equal(f"{tag}: distinct image counts trained on over the ranks", len(set(e["samples_per_rank"])), 1),
                  equal(f"{tag}: validation images gathered from every rank", e["val_images"], val),
                  equal(f"{tag}: loss finite", math.isfinite(e["loss"]), True)]
    return part_result(gates, processes=n, backend=backend,
                       **({"stderr_tail": r.stderr[-1500:]} if r.returncode else {}))


def compile_part(check: Check) -> dict:
    from model.checkpoint import load_checkpoint
    check.demo  # noqa: B018
    gates = []
    for epochs in (1, 2):  # the second run resumes the first's checkpoint into a freshly compiled model
        config = check.demo_config("compile", {"model": {"compile": True}, "train": {"epochs": epochs}},
                                   fresh=epochs == 1)
        r = run_child(check, ["--config", str(config), "--stage", "train"], f"compile_{epochs}")
        gates.append(equal(f"train to epoch {epochs}: exit code", r.returncode, 0))
        if r.returncode:
            return part_result(gates, stderr_tail=r.stderr[-1500:])
    last = check.work / "compile" / "artifacts" / "train" / "checkpoints" / "last.pt"
    saved = load_checkpoint(last)
    gates += [equal("epochs in last.pt after the resumed run", saved["epoch"], 2),
              equal("weights saved without compile's prefixes",
                    [k for k in saved["model"] if "_orig_mod" in k or k.startswith("module.")], [])]
    r = subprocess.run([sys.executable, "-m", "inference.submit", "--config", str(config), "--stage", "2",
                        "--checkpoint", str(last.with_name("best.pt"))], cwd=REPO, capture_output=True, text=True,
                       env=child_env(check), timeout=1800)
    gates.append(equal("submit with the compiled run's checkpoint: exit code", r.returncode, 0))
    return part_result(gates, backend="eager" if check.profile.quick else "inductor")


def resume(check: Check) -> dict:
    """Two uninterrupted runs (the second measures the device's own nondeterminism), one killed with SIGKILL at
    its first mid-epoch checkpoint and run again."""
    from model.checkpoint import load_checkpoint
    check.demo  # noqa: B018
    # dropout draws random numbers every step and the lr steps after epoch 1: a resume that forgot the random
    # state, the schedule or DALI's position ends elsewhere; fp16 on a GPU so that the GradScaler's state matters
    changes = {"model": {"drop_rate": 0.3, **({} if check.profile.rehearsal else {"amp_dtype": "float16"})},
               "train": {"epochs": 2, "lr_step_epochs": 1, "log_every": 1, "checkpoint_every_steps": 4}}
    runs = {}
    for name in ("clean", "clean_again", "killed"):
        runs[name] = ["--config", str(check.demo_config(f"resume_{name}", changes)), "--stage", "train"]
    for name in ("clean", "clean_again"):
        r = run_child(check, runs[name], f"resume_{name}")
        if r.returncode:
            return part_result([equal(f"{name} run: exit code", r.returncode, 0)], stderr_tail=r.stderr[-1500:])
    last = check.work / "resume_killed" / "artifacts" / "train" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(child_command(check, *runs["killed"]), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=child_env(check))
    while not last.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last) if last.exists() else {}
    step_in_epoch = (killed_at.get("epoch_progress") or {}).get("step", 0)
    r = run_child(check, runs["killed"], "resume_resumed")
    gates = [equal("killed run: finished epochs in its last.pt", killed_at.get("epoch"), 0),
             at_least("killed run: steps into the epoch in its last.pt (a mid-epoch checkpoint)", step_in_epoch, 1),
             equal("resumed run: exit code", r.returncode, 0),
             equal("resumed run says where it resumed", "resuming train" in r.stdout + r.stderr, True)]
    if r.returncode:
        return part_result(gates, stderr_tail=r.stderr[-1500:])
    clean = load_checkpoint(check.work / "resume_clean" / "artifacts" / "train" / "checkpoints" / "last.pt")
    again = load_checkpoint(check.work / "resume_clean_again" / "artifacts" / "train" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(last)
    gates += [equal("steps", resumed["step"], clean["step"]),
              weights_match(resumed["model"], clean["model"], again["model"], check.profile.resume_floor)]
    return part_result(gates, killed_at_step=step_in_epoch,
                       autocast=None if check.profile.rehearsal else "float16 with GradScaler")


def image_blind_gap(val_targets: list[list[int]], class_counts: list[int], k: int, seed: int = 0) -> dict:
    """The GAP of predictors that never look at the image: every image ranked by the training class frequencies
    (what a model trained on labels shuffled across images learns at best) and by random scores (an untrained
    model)."""
    from model.metrics import global_average_precision
    n, c = len(val_targets), len(class_counts)
    prior = np.tile(np.asarray(class_counts, dtype=np.float64), (n, 1))
    prior += np.random.default_rng(seed).random((n, c)) * 1e-6  # ties broken at random, not by class index
    rand = np.random.default_rng(seed + 1).random((n, c))
    out = {}
    for name, scores in (("class_frequency", prior), ("random", rand)):
        idx = np.argsort(-scores, axis=1)[:, :k]
        out[name] = float(global_average_precision(idx, np.take_along_axis(scores, idx, 1), val_targets))
    return out


def commands(check: Check) -> dict:
    """The README's path on demo data, in this process: build (done), train, tune, submit stage 2."""
    from common.config import load_config
    from common.shard_format import read_manifest, split_shards
    from inference.score import read_labels, score
    from inference.submit import submit
    from model.checkpoint import load_checkpoint
    from training.train import train
    check.demo  # noqa: B018
    cfg = load_config(check.demo_config("commands", {"train": {"epochs": 6}, "tune": {"epochs": 10}}))
    record = train(cfg, "train")
    train(cfg, "tune")
    tuned = cfg.paths.artifacts / "tune" / "checkpoints" / "best.pt"
    summary = submit(cfg, 2, tuned)
    manifest = read_manifest(cfg.paths.shards)
    val = shard_truth(split_shards(cfg.paths.shards, "val"))
    blind = image_blind_gap(list(val.values()), manifest["class_counts"]["train"], cfg.predict.top_k)
    floor = max(blind.values()) + check.profile.gap_margin
    f2, missing, _ = score(read_labels(Path(summary["submission"])),
                           read_labels(cfg.paths.competition_data / "stage_2_solution.csv"))
    gates = [at_least("train: validation GAP", record["val_gap"], floor),
             equal("tune: checkpoint holds a decision rule", bool(load_checkpoint(tuned).get("decision_rule")), True),
             equal("submission: images predicted", summary["predicted"], summary["images"]),
             equal("submission: solution images missing", missing, 0)]
    return part_result(gates, val_gap=round(record["val_gap"], 4), image_blind_gap={k: round(v, 4) for k, v in
                                                                                     blind.items()},
                       gap_floor_rule=f"best image-blind GAP + {check.profile.gap_margin}",
                       train_images_per_s=round(record["images_per_s"], 1),
                       data_wait_share=round(record["data_wait_share"], 3), stage2_f2=round(f2, 4))


RUNNERS: dict[str, Callable[[Check], dict]] = {"parity": parity, "throughput": throughput,
                                               "training_steps": training_steps, "ddp": ddp,
                                               "compile": compile_part, "resume": resume, "commands": commands}


# -------------------------------------------------------------------------------------------------- faults

def apply_fault(name: str | None) -> None:
    """Put one known bug into this process (and, through GPU_CHECK_FAULT, into its training children)."""
    if not name:
        return
    import dali_pipes.loader as loader
    if name == "slow-loader":  # a loader that cannot keep up: half a second per batch
        iterate = loader.DaliLoader.__iter__

        def slow(self):
            for batch in iterate(self):
                time.sleep(0.5)
                yield batch
        loader.DaliLoader.__iter__ = slow
    elif name == "ignore-dali-checkpoint":  # resume restores everything but the pipeline's position
        import training.train as training
        resume_or_init = training.resume_or_init
        training.resume_or_init = lambda *a, **kw: (resume_or_init(*a, **kw), None)[1]
    elif name == "shuffled-labels":  # each image handed over with its neighbour's labels
        multi_hot = loader.multi_hot
        loader.multi_hot = lambda padded, n: multi_hot(padded, n).roll(1, 0)
    else:
        raise SystemExit(f"error: unknown fault {name!r} (one of {', '.join(FAULTS)})")


def child(argv: list[str]) -> None:
    """``gpu_check.py _train ...``: ``python -m training.train ...`` with the check's fault applied, and with
    --quick torch.compile's eager backend (no code generation: seconds instead of minutes on a small CPU)."""
    apply_fault(os.environ.get("GPU_CHECK_FAULT"))
    if os.environ.get("GPU_CHECK_EAGER_COMPILE"):
        compile_ = torch.compile
        torch.compile = lambda model, **kw: compile_(model, backend="eager")
    from training.train import main as train_main
    train_main(argv)


# ---------------------------------------------------------------------------------------------------- main

def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def device_description(check: Check) -> dict:
    import nvidia.dali
    out = {"kind": check.device.kind, "torch": torch.__version__, "cuda": torch.version.cuda,
           "dali": nvidia.dali.__version__, "cores": len(os.sched_getaffinity(0)), "cpu": cpu_name()}
    if check.device.kind == "gpu":
        out.update(name=torch.cuda.get_device_name(check.device.device_id), gpus=torch.cuda.device_count(),
                   autocast=str(check.amp_dtype).removeprefix("torch."))
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, metavar="PATH", help="where to write the report")
    parser.add_argument("--rehearse", action="store_true", help="run every part on the CPU, with CPU thresholds")
    parser.add_argument("--quick", action="store_true", help="with --rehearse: small data and short windows")
    parser.add_argument("--only", metavar="PART[,PART]", help=f"run these parts only: {', '.join(PARTS)}")
    parser.add_argument("--fault", choices=FAULTS, help="put this known bug into the run, to see a gate fail")
    parser.add_argument("--work", type=Path, help="keep the data and logs here (default: a temporary folder, "
                                                  "removed at the end)")
    args = parser.parse_args(argv)
    args.parts = PARTS if args.only is None else tuple(p.strip() for p in args.only.split(",") if p.strip())
    if not args.parts:
        parser.error(f"--only names no part; the parts are {', '.join(PARTS)}")
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if args.quick and not args.rehearse:
        parser.error("--quick goes with --rehearse (a GPU check with short windows would prove nothing)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_train"]:
        child(argv[1:])
        return 0
    args = parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU that PyTorch can use, and this machine has none "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "--rehearse runs the same parts on the CPU", file=sys.stderr)
        return 2
    from common.errors import UserError
    from common.log import setup_logging
    from common.paths import writable_dir, writable_file
    try:
        writable_file(args.json, "--json")  # now, not after the first part has run
        if args.work:
            writable_dir(args.work, "--work")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(logging.WARNING)  # the parts' own progress bars and notes would bury the report's lines
    apply_fault(args.fault)
    profile = (QUICK if args.quick else REHEARSAL) if args.rehearse else GPU
    work = args.work or Path(tempfile.mkdtemp(prefix="iic_gpu_check_"))
    print(f"data and logs in {work}" + ("" if args.work else " (removed at the end; --work DIR keeps them)"),
          flush=True)
    check = Check(profile, work, args.fault)
    report = {"passed": False, "rehearsal": profile.rehearsal, "quick": profile.quick, "fault": args.fault,
              "date": time.strftime("%Y-%m-%d %H:%M"), "device": device_description(check),
              "profile": asdict(profile), "parts": {}}
    try:
        for name in args.parts:
            started = time.perf_counter()
            try:
                result = RUNNERS[name](check)
            except Exception as exc:  # one broken part must not hide the others' figures
                result = {"passed": False, "gates": [], "error": f"{type(exc).__name__}: {exc}"[:2000],
                          "traceback": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.perf_counter() - started, 1)
            report["parts"][name] = result
            report["passed"] = all(p["passed"] for p in report["parts"].values())
            args.json.write_text(json.dumps(report, indent=1) + "\n")  # after each part: a timeout keeps the rest
            failed = [g["name"] for g in result["gates"] if not g["passed"]]
            verdict = "passed" if result["passed"] else "FAILED: " + ("; ".join(failed) or result.get("error", ""))
            print(f"{name}: {verdict} ({result['seconds']} s)", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'all gates passed' if report['passed'] else 'some gates FAILED'}; report in {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
