#!/usr/bin/env python3
"""Every GPU path of the project in one run, each figure with a rule that can fail, and a JSON report.

    python -m benchmarks.gpu_check --json gpu_check.json                  # on a GPU machine: about 8 minutes
    python -m benchmarks.gpu_check --rehearse --json rehearsal.json       # the same parts on the CPU
    python -m benchmarks.gpu_check --only parity,resume --json part.json  # some parts only

The parts, each a list of gates (name, measured value, rule, passed, and the rule's basis: exact, measured in
this run, or a design requirement):
  parity          every GPU graph against its CPU graph on the same data: eval (each output dtype, every predict.tta,
                  with and without the resize), full-size test images (at the training resolution and at every
                  tune.test_resolutions candidate), train with the same seed (float16, float32 and uint8 out, crop_flip
                  and random_resized_crop, a resolution schedule's sides, machine labels): batch and image counts,
                  ids, labels (also against the shards), the mean and the worst batch's 99.9th percentile of the
                  pixel difference within twice what libjpeg-turbo's two IDCTs differ by on the same images, the
                  ten-crop order on every batch
  throughput      the decode-only ceiling, the train and eval loaders (images/s, median of timed windows); the
                  train loader must deliver 1.5x the model's own training steps; the loader and the steps at each
                  side of a resolution schedule
  training_steps  the share of step time the model's steps wait for the DALI train loader, against the same steps
                  on one batch kept on the device (GPU: SE-ResNet101, bf16, channels-last); memory as the driver
                  sees the process (DALI's pools included) beside torch's own figure
  ddp             torchrun, NCCL with a GPU a process where there are two or more, else two processes sharing one
                  GPU over gloo (the CPU: gloo): the train stage with a resolution schedule (the validation gathered
                  from every rank's replica must be what one process computes from the saved weights, within what
                  batching alone moves it), then the tune stage (one process trains it; test resolution, rule)
  compile         model.compile: true trains across two crop sides (one recompilation), saves plain weight names,
                  resumes into a new process
  resume          a run killed with SIGKILL at a mid-epoch checkpoint after a change of crop side and resumed,
                  against the run uninterrupted (GPU: fp16 with its GradScaler), within what a second uninterrupted
                  run differs by
  commands        the README's commands on demo data with every lever (machine labels, the triangular rate and a
                  resolution schedule, the unseen-class threshold, the test resolution), a stage-2 submission,
                  inference.ensemble and a one-pass ENSEMBLE submission; the train run's validation GAP must clear a
                  floor no image-blind model reaches

Report: {"passed", "rehearsal", "device", "machine_lacks", "parts": {NAME: {"passed", "gates": [...], "seconds",
...}}, "gpu_estimate" (rehearsals: each part's expected seconds on a GPU machine)}, written after every part.
Exit 0 when every gate passed, 1 when one failed (or a part broke), 2 when the check cannot run here.
--rehearse: every part on the CPU with CPU thresholds (gloo, the CPU graphs against the other output dtypes,
timm's test_resnet, small data); --quick: small enough for the test suite (0.5 s windows, eager torch.compile;
its speed gates are recorded, not gated: on windows that short, on cores other work may share, they prove nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from itertools import islice, repeat
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from benchmarks import harness
from benchmarks.harness import REPO, metrics_epochs
from common.atomic import atomic_write_text
from common.config import load_config
from common.errors import UserError
from common.log import setup_logging
from common.paths import writable_dir, writable_file
from common.shard_format import decode_labels, decode_meta, iter_samples, read_manifest, split_shards
from common.tune_split import tune_parts
from common.threads import usable_cores

PARTS = ("parity", "throughput", "training_steps", "ddp", "compile", "resume", "commands")
TRAINING = ("-m", "training.train")  # what the training children run: python -m training.train ARGS


@dataclass
class Gate:
    name: str
    value: Any
    rule: str
    passed: bool
    basis: str = "exact"  # where its bound comes from: exact, measured (in this run: what), or design (a requirement)
    gated: bool = True  # False: recorded beside its rule, but its part passes or fails without it


def at_least(name: str, value: float, floor: float, basis: str = "design") -> Gate:
    return Gate(name, _round(value), f">= {_round(floor)}", bool(value >= floor), basis)


def at_most(name: str, value: float, ceiling: float, basis: str = "exact") -> Gate:
    return Gate(name, _round(value), f"<= {_round(ceiling)}", bool(value <= ceiling), basis)


def equal(name: str, value: Any, expected: Any) -> Gate:
    return Gate(name, value, f"== {expected}", bool(value == expected))


def _round(x):
    return round(float(x), 6) if isinstance(x, (float, np.floating)) else x


@dataclass
class Batch:
    """A loader batch on the CPU: input as float (``[B, (V,) C, H, W]``), targets (test images: positions), ids."""
    images: torch.Tensor
    labels: torch.Tensor
    ids: list | None


@dataclass(frozen=True)
class Tolerance:
    """How far a device's pixels may be from the CPU's (normalised units), and why: twice what two correct JPEG
    decoders differ by on the same images, measured in the same run (``decoder_noise``)."""
    mean: float
    p999: float
    basis: str = "exact"


def p999(diff: np.ndarray) -> float:
    """The 99.9th percentile of a flat array (an element of it, not an interpolation)."""
    k = min(diff.size - 1, int(math.ceil(0.999 * diff.size)) - 1)
    return float(np.partition(diff, k)[k])


def batch_parity(name: str, device: list[Batch], reference: list[Batch], tolerance: Tolerance) -> list[Gate]:
    """Counts before pixels, so that a short list cannot compare equal over its common prefix; the worst batch's
    figures beside the overall mean, so that one bad batch among many cannot hide in an average."""
    gates = [equal(f"{name}: batches", len(device), len(reference)),
             equal(f"{name}: images", sum(len(b.images) for b in device), sum(len(b.images) for b in reference))]
    if not all(g.passed for g in gates):
        return gates
    pairs = list(zip(device, reference))
    shapes = all(d.images.shape == r.images.shape for d, r in pairs)
    gates += [equal(f"{name}: shapes equal", shapes, True),
              equal(f"{name}: ids equal", all(d.ids == r.ids for d, r in pairs), True),
              equal(f"{name}: labels equal", all(torch.equal(d.labels, r.labels) for d, r in pairs), True)]
    if not shapes:
        return gates
    total, count, worst_mean, worst_p999 = 0.0, 0, 0.0, 0.0
    for d, r in pairs:
        diff = (d.images.float() - r.images.float()).abs().flatten().numpy()
        total += float(diff.sum(dtype=np.float64))
        count += diff.size
        worst_mean = max(worst_mean, float(diff.mean()))
        worst_p999 = max(worst_p999, p999(diff))
    t = tolerance
    return gates + [at_most(f"{name}: mean abs diff", total / max(count, 1), t.mean, t.basis),
                    at_most(f"{name}: worst batch mean abs diff", worst_mean, 2 * t.mean, t.basis),
                    at_most(f"{name}: worst batch p99.9 abs diff", worst_p999, t.p999, t.basis)]


def tencrop_order(name: str, batches: list[Batch], centre: list[Batch] | None = None,
                  tolerance: Tolerance = Tolerance(0.0, 0.0)) -> list[Gate]:
    """Views 5..9 mirror views 0..4 on every batch (exactly: the same decoded pixels, mirrored), and view 4 is the
    plain centre crop (``centre``: the same images through tta none, decoded apart, by a region-of-interest decode
    where the graph does not resize: within the parity ``tolerance`` in the mean and at the 99.9th percentile; a
    corner in its place would be far off)."""
    mirrored = sum(bool((b.images[:, 5:] - b.images[:, :5].flip(-1)).abs().max() == 0) for b in batches)
    gates = [equal(f"{name}: batches whose views 5-9 mirror 0-4", mirrored, len(batches))]
    if centre is not None:
        pairs = [(b.images[:, 4], c.images) for b, c in zip(batches, centre) if b.images[:, 4].shape == c.images.shape]
        if len(pairs) != len(batches) or len(centre) != len(batches):
            return gates + [equal(f"{name}: view 4 has the centre crop's shape on every batch", False, True)]
        diff = torch.cat([(v - c).abs().flatten() for v, c in pairs]).numpy()
        gates += [at_most(f"{name}: view 4 against the centre crop (mean abs diff)", float(diff.mean()),
                          tolerance.mean, tolerance.basis),
                  at_most(f"{name}: view 4 against the centre crop (p99.9 abs diff)", p999(diff), tolerance.p999,
                          tolerance.basis)]
    return gates


def labels_match_truth(name: str, batches: list[Batch], truth: dict[str, list[int]]) -> Gate:
    """Each image's targets against the classes its shard sample holds (read from the tar, not through DALI):
    catches labels handed over with the wrong images."""
    rows = [(image_id, row) for b in batches for image_id, row in zip(b.ids, b.labels)]
    wrong = sum(torch.nonzero(row).flatten().tolist() != truth.get(image_id) for image_id, row in rows)
    return Gate(f"{name}: images whose labels are their shard sample's", f"{len(rows) - wrong} of {len(rows)}",
                f"all of {len(truth)}", len(rows) == len(truth) and wrong == 0)


def soft_targets_match_shards(name: str, loader, shards) -> Gate:
    """One pass of a train loader with machine labels (batch 1: nothing dropped): the multiset of its target rows
    against the rows the shards' labels and machine labels make (read from the tars, not through DALI)."""
    from common.shard_format import decode_machine
    truth = []
    for tar in shards.tars:
        for _, files in iter_samples(tar):
            row = np.zeros(shards.num_classes)
            row[decode_labels(files["labels"])] = 1
            classes, confidences = decode_machine(files)
            row[classes] = np.maximum(row[classes], confidences)
            truth.append(tuple(np.round(row, 3)))
    got = [tuple(np.round(t.float().cpu().numpy().astype(np.float64), 3)) for _, targets in loader for t in targets]
    same = sorted(got) == sorted(truth)
    return Gate(f"{name}: a pass's soft targets are the shards' labels and machine labels", f"{len(got)} rows",
                f"the {len(truth)} rows of the shards", same)


def loader_keeps_up(loader_rate: float, step_rate: float, min_ratio: float = 1.5) -> Gate:
    return at_least("train loader / model training steps (images/s)", loader_rate / step_rate, min_ratio,
                    f"design: the loader {min_ratio}x the model, so that the model never waits")


def data_wait_share(fed_rate: float, synthetic_rate: float) -> float:
    """1 - fed/synthetic, as measured: noise can make it negative, and it is recorded so, not clipped."""
    return 1.0 - fed_rate / synthetic_rate


def data_wait(fed_rate: float, synthetic_rate: float, max_share: float) -> Gate:
    return at_most("share of step time waiting for data", data_wait_share(fed_rate, synthetic_rate), max_share,
                   f"design: at most {max_share} of a step waiting for data")


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every floating-point tensor of two state dicts (inf when the keys differ)."""
    if a.keys() != b.keys():
        return math.inf
    floats = [k for k in b if b[k].is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in floats)
    den = sum(float(b[k].double().pow(2).sum()) for k in floats)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def weights_match(resumed: dict, clean: dict, clean_again: dict, floor: float) -> Gate:
    """Within what a second uninterrupted run differs by (twice it, or ``floor``): bitwise where the device is
    deterministic (the CPU), measured where it is not."""
    noise = relative_difference(clean_again, clean)
    tolerance = max(2 * noise, floor)
    difference = relative_difference(resumed, clean)
    return Gate("weights: resumed vs uninterrupted (relative L2)", _round(difference),
                f"<= {_round(tolerance)} (2 x a second uninterrupted run's {_round(noise)}, at least {floor})",
                difference <= tolerance, f"measured: 2 x a second uninterrupted run's difference ({_round(noise)})"
                if noise else ("exact: the second uninterrupted run is bitwise the first" if not floor else
                               f"measured, with a floor of {floor}: the second run is bitwise the first"))


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
    max_wait_share: float  # design: the share of a step the model may wait for data
    resume_floor: float  # the resume tolerance's floor (relative L2)
    gap_margin: float  # design: the commands part's GAP must beat the best image-blind predictor by this much
    max_spread: float | None  # a timed figure's windows may differ by this factor at most (None: not gated)
    gate_speed: bool = True  # False: the speed gates are recorded, not gated
    sides: tuple[int, ...] = (160,)  # a resolution schedule's side below the 224-px crop (configs/fast.yaml's first)
    test_resolutions: tuple[tuple[int, int], ...] = ((256, 224), (292, 256), (329, 288))
    quick: bool = False


GPU = Profile(rehearsal=False, device="gpu", model="seresnet101", batch_size=128, photos=1000, test_images=32,
              demo_train=600, window_s=2.0, windows=2, max_wait_share=0.05, resume_floor=1e-4, gap_margin=0.05,
              max_spread=1.25)
# on the CPU both sides decode with libjpeg-turbo; the CPU's cores are shared by DALI's threads and the model's, so
# a fed step waits for data more
REHEARSAL = Profile(rehearsal=True, device="cpu", model="test_resnet", batch_size=32, photos=600, test_images=24,
                    demo_train=600, window_s=2.0, windows=2, max_wait_share=0.15, resume_floor=0.0, gap_margin=0.05,
                    max_spread=1.5)
# the test suite's form: the parts' wiring and their gates, on windows too short to gate their spread or, on cores
# that the suite's other work may share, the speeds they measure
QUICK = replace(REHEARSAL, photos=200, test_images=8, demo_train=240, window_s=0.5, max_spread=None, gate_speed=False,
                quick=True)


def speed(gate: Gate, profile: Profile) -> Gate:
    """A gate on how fast something ran: recorded, not gated, where the profile says its timings prove nothing."""
    if profile.gate_speed:
        return gate
    return replace(gate, gated=False, basis=f"{gate.basis}; recorded, not gated: --quick's short windows")


def steady(figures: dict, profile: Profile) -> list[Gate]:
    """Timed figures whose windows disagree this much were taken on a busy machine: say so, not trust them."""
    if profile.max_spread is None:
        return []
    return [at_most(f"{name}: window spread (max / min images/s)", figure["spread"], profile.max_spread,
                    "design: a busier machine than this is not measured but flagged")
            for name, figure in figures.items() if "spread" in figure]


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


@contextlib.contextmanager
def jpeg_engine_watch(index: int) -> Iterator[dict]:
    """Whether the hardware JPEG decoder (NVJPG) worked while the block ran (filled in at its end), from ``nvidia-smi
    dmon``'s jpg utilisation column (drivers that have one); None when it cannot be told."""
    result = {"hardware_decoder_used": None}
    if not shutil.which("nvidia-smi"):
        yield result
        result["why"] = "no nvidia-smi"
        return
    proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-i", str(index)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        yield result
    finally:
        proc.terminate()
        lines = proc.communicate(timeout=30)[0].splitlines()
    header = next((line.lstrip("#").split() for line in lines if line.startswith("# gpu")), [])
    if "jpg" not in header:
        result["why"] = "nvidia-smi dmon reports no jpg column on this driver"
        return
    col = header.index("jpg")
    values = [int(v[col]) for v in (line.split() for line in lines if line and line[0] != "#")
              if len(v) > col and v[col].isdigit()]
    result.update(hardware_decoder_used=bool(values) and max(values) > 0,
                  max_jpg_utilisation_percent=max(values, default=None))


class Check:
    """The data, configs and measurements the parts share; everything under one work folder."""

    def __init__(self, profile: Profile, work: Path, train_program: tuple[str, ...] = TRAINING):
        from common.device import resolve_device
        from common.runtime import autocast_dtype
        self.profile, self.work, self.train_program = profile, work, tuple(train_program)
        self.device = resolve_device(profile.device)
        self.amp_dtype = autocast_dtype(self.device.kind == "gpu", True)

    def pipes(self, cfg, device=None):
        """The loaders' settings for ``cfg`` on the check's device (with its autocast dtype) or on ``device``."""
        from dali_pipes.settings import PipeSettings
        return PipeSettings.from_config(cfg, device=device or self.device,
                                        amp_dtype=self.amp_dtype if device is None else None)

    @cached_property
    def photo_shards(self) -> Path:
        return harness.photo_shards(self.work / "photos", self.profile.photos)

    @cached_property
    def test_images(self) -> list[Path]:
        """Full-size originals (1024 px on the long side), as the stage-1/2 test folders hold them."""
        from benchmarks.photos import photo_jpegs
        folder = self.work / "test_images"
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / f"{k:016x}.jpg" for k in range(self.profile.test_images)]
        for file, jpeg in zip(files, photo_jpegs(self.profile.test_images, long_side=1024, seed=7)):
            file.write_bytes(jpeg)
        return files

    def photo_config(self, *overrides: str):
        return load_config(REPO / "config.yaml", [f"paths.shards={self.photo_shards}", "model.channels_last=true",
                                                  f"pipeline.device={self.profile.device}", *overrides])

    @cached_property
    def demo(self):
        from demo.data import generate_demo_data
        from preprocessing.build_shards import build_shards
        layout = generate_demo_data(self.work / "demo", n_train=self.profile.demo_train, n_stage1=80, n_stage2=120,
                                    n_tune=60)
        # with machine labels: parity checks their graph; the training parts read the same shards without them
        build_shards(load_config(self.demo_config("demo_build", {"data": {"machine_labels": True}})),
                     workers=min(4, usable_cores()))
        return layout

    def demo_config(self, name: str, changes: dict | None = None, fresh: bool = True) -> Path:
        """The demo config on the check's demo data, with artifacts of its own (``fresh``: none from an earlier run)."""
        import yaml
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

    def checkpoint(self, name: str, file: str = "last.pt") -> Path:
        """A checkpoint of the train stage run with ``demo_config(name)``."""
        return self.work / name / "artifacts" / "train" / "checkpoints" / file

    def train_command(self, *args: str) -> list[str]:
        """A training process: ``python -m training.train ARGS`` (or the program the check was given)."""
        return [sys.executable, *self.train_program, *args]

    def run_logged(self, command: list[str], log_name: str | None = None, env: dict | None = None
                   ) -> subprocess.CompletedProcess:
        r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                           env={**os.environ, **(env or {})})
        if log_name:
            (self.work / f"{log_name}.log").write_text(r.stdout + r.stderr)
        return r

    def timed(self, batches, step: Callable | None = None) -> dict:
        return self.interleaved({"it": (batches, step)})["it"]

    def interleaved(self, streams: dict) -> dict:
        return harness.interleaved(streams, self.profile.batch_size, self.profile.window_s, self.profile.windows)

    @cached_property
    def steps(self) -> dict:
        """The model's own training steps, built once for throughput and training_steps."""
        from common.runtime import InputAdapter
        from dali_pipes.loader import train_loader
        from model.network import create_model
        from training.losses import per_positive_softmax_loss
        from training.train import training_step
        cfg, shards = self.photo_config(), split_shards(self.photo_shards, "train")
        to_input = InputAdapter.from_config(cfg)
        if self.device.kind == "gpu":
            torch.backends.cudnn.benchmark = True
        model = create_model(self.profile.model, shards.num_classes, channels_last=True).to(self.device.torch_device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        def step(batch):
            training_step(model, opt, scaler, per_positive_softmax_loss, to_input(batch[0]), batch[1], self.amp_dtype)
        # one stream for the run: a second iter() would restart DALI mid-epoch
        stream = train_loader(self.pipes(cfg), shards, self.profile.batch_size).stream()
        images, targets = next(stream)
        return {"step": step, "stream": stream, "one_batch": repeat((images.clone(), targets.clone()))}


def part_result(gates: list[Gate], failed_run: subprocess.CompletedProcess | None = None, **figures) -> dict:
    tail = {"stderr_tail": failed_run.stderr[-1500:]} if failed_run else {}
    return {"passed": all(g.passed or not g.gated for g in gates), "gates": [asdict(g) for g in gates], **figures, **tail}


def collect(batches, cfg, limit: int | None = None) -> list[Batch]:
    from common.runtime import InputAdapter
    to_input = InputAdapter.from_config(cfg)
    return [Batch(to_input(b[0]).float().cpu(), b[1].cpu(), list(b[2]) if len(b) > 2 else None)
            for b in islice(batches, limit)]


def shard_truth(shards) -> dict[str, list[int]]:
    return {decode_meta(files["json"])["image_id"]: sorted(int(c) for c in decode_labels(files["labels"]))
            for tar in shards.tars for _, files in iter_samples(tar)}


def decoder_noise(shards, std: tuple, batches: int = 4) -> Tolerance:
    """What two correct JPEG decoders differ by on these images, measured: libjpeg-turbo's accurate IDCT against
    its fast one (on the CPU, over ``batches`` batches of 16), the kind of rounding in which nvJPEG and the hardware
    decoder differ from libjpeg-turbo. A device may differ from the CPU by twice it (mean and 99.9th percentile of
    the absolute difference, in the normalised units the parity gates compare)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def decoded(fast: bool):
        jpegs, _ = fn.readers.webdataset(paths=[str(t) for t in shards.tars], index_paths=[str(i) for i in
                                                                                           shards.indexes],
                                         ext=["jpg", "labels"], dtypes=[types.UINT8, types.INT32])
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, use_fast_idct=fast)
    accurate, fast = decoded(False), decoded(True)
    accurate.build()
    fast.build()
    diff = np.concatenate([np.abs(np.array(a, dtype=np.int16) - np.array(b, dtype=np.int16)).ravel()
                           for _ in range(batches) for a, b in zip(accurate.run()[0], fast.run()[0])])
    mean, p999 = float(diff.mean()), float(np.percentile(diff, 99.9))
    unit = 255 * float(np.mean(std))  # one level of 0..255 in normalised units
    return Tolerance(2 * mean / unit, 2 * p999 / unit,
                     f"measured: 2 x libjpeg-turbo's accurate against its fast IDCT on these images ({mean:.2f} levels "
                     f"in the mean, {p999:.1f} at p99.9)")


def parity(check: Check) -> dict:
    """Every graph the GPU runs against its CPU graph on the same data: eval (each output dtype, tta, with and
    without the resize), test images (each test-resolution candidate), train (each output dtype and augmentation,
    a resolution schedule's sides, machine labels: their windows and flips are drawn from the same seed on either
    device)."""
    from common.device import resolve_device
    from dali_pipes.loader import ImageFileLoader, eval_loader, train_loader
    p, cpu = check.profile, resolve_device("cpu")
    val, train = split_shards(check.photo_shards, "val"), split_shards(check.photo_shards, "train")
    truth = shard_truth(val)
    reference_cfg = check.photo_config("pipeline.dtype=uint8")
    tolerance = decoder_noise(val, reference_cfg.pipeline.std)
    gates, centre = [], {}

    def compare(name, loader, overrides, limit=None, cfg_of=check.photo_config) -> list[Batch]:
        """``loader(pipe settings)`` on the device against the CPU reference (uint8 output, the other overrides
        alike): adds the parity gates, returns the device's batches."""
        dev_cfg = cfg_of(*overrides)
        ref_cfg = cfg_of("pipeline.dtype=uint8", *overrides[1:])
        dev = collect(loader(check.pipes(dev_cfg)), dev_cfg, limit)
        ref = collect(loader(check.pipes(ref_cfg, cpu)), ref_cfg, limit)
        gates.extend(batch_parity(name, dev, ref, tolerance))
        return dev

    # (name, overrides, tta): every output dtype; every tta with and without the eval resize
    cases = [(f"eval {dtype}", [f"pipeline.dtype={dtype}"], "none") for dtype in ("float32", "uint8")]
    cases += [(f"eval float16 tta={tta}{' resized' if resize else ''}",
               ["pipeline.dtype=float16"] + (["data.shortest_side=288"] if resize else []), tta)
              for resize in (False, True) for tta in ("none", "flip", "tencrop")]
    for name, overrides, tta in cases:
        dev = compare(name, lambda pipes: eval_loader(pipes, val, 16, tta=tta), overrides)
        gates.append(labels_match_truth(name, dev, truth))
        if tta == "none":
            centre[bool(overrides[1:])] = dev
        if tta == "tencrop":
            gates += tencrop_order(name, dev, centre[bool(overrides[1:])], tolerance)
    # the test-image graph: full-size originals, resized with antialiasing, at the training resolution (centre crop
    # and ten crops) and at every test-resolution candidate
    for tta in ("none", "tencrop"):
        compare(f"test images tta={tta}", lambda pipes: ImageFileLoader(pipes, check.test_images, 8, tta=tta),
                ["pipeline.dtype=float16"])
    for short, crop in p.test_resolutions:
        compare(f"test images at {short}/{crop}", lambda pipes: ImageFileLoader(
            pipes, check.test_images, 8, resolution=(short, crop)), ["pipeline.dtype=float16"])
    # the train graph: every output dtype and augmentation, and a resolution schedule's sides (the 224-px window
    # resized: the window's own side through the resize too)
    for dtype in ("float16", "float32", "uint8"):
        for augmentation in ("crop_flip", "random_resized_crop"):
            compare(f"train {dtype} {augmentation} (same seed)", lambda pipes: train_loader(pipes, train, 16),
                    [f"pipeline.dtype={dtype}", f"pipeline.augmentation={augmentation}"], limit=4)
    for side in (*p.sides, 224):
        compare(f"train float16 at {side} px of the 224-px window", lambda pipes: train_loader(pipes, train, 16,
                                                                                           size=side),
                ["pipeline.dtype=float16"], limit=4)
    # machine labels (the demo shards carry them): the soft targets, exactly, and over a pass those of the shards
    check.demo  # noqa: B018
    demo_train = split_shards(check.work / "demo_shards", "train")
    demo_cfg = check.demo_config("parity_demo")
    compare("train with machine labels", lambda pipes: train_loader(pipes, demo_train, 16, machine_labels=True),
            ["pipeline.dtype=float16"], limit=4, cfg_of=lambda *o: load_config(demo_cfg, o))
    gates.append(soft_targets_match_shards("train with machine labels", train_loader(
        check.pipes(load_config(demo_cfg)), demo_train, 1, machine_labels=True), demo_train))
    return part_result(gates, compared_images=len(truth), test_images=len(check.test_images),
                       tolerance=asdict(tolerance))


def throughput(check: Check) -> dict:
    from dali_pipes.loader import eval_loader, train_loader
    from dali_pipes.pipelines import decode_only_pipeline
    p, bs, on_gpu = check.profile, check.profile.batch_size, check.device.kind == "gpu"
    cfg, shards = check.photo_config(), split_shards(check.photo_shards, "train")
    pipes = check.pipes(cfg)
    ceiling = decode_only_pipeline(shards.tars, shards.indexes, on_gpu=on_gpu, batch_size=bs,
                                   num_threads=pipes.threads,
                                   device_id=check.device.device_id,
                                   prefetch_queue_depth=cfg.pipeline.prefetch_queue_depth)
    ceiling.build()
    with jpeg_engine_watch(check.device.device_id) if on_gpu else contextlib.nullcontext() as nvjpeg:
        figures = {"decode_ceiling": check.timed(harness.pipeline_runs(ceiling))}
    if on_gpu:
        figures["nvjpeg"] = nvjpeg
    del ceiling
    figures["eval_loader"] = check.timed(eval_loader(pipes, shards, bs).stream())
    # the loader against the model's own steps on one batch kept on the device, windows in turn
    train = train_loader(pipes, shards, bs)
    both = check.interleaved({"train_loader": (train.stream(), None),
                              "model_training_steps": (check.steps["one_batch"], check.steps["step"])})
    figures.update(train_loader=both["train_loader"], model_training_steps=both["model_training_steps"])
    gates = [speed(loader_keeps_up(both["ratios"]["train_loader"]["model_training_steps"], 1.0), p),
             *steady(figures, p)]
    del train
    # a resolution schedule's sides: the loader (the 224-px window resized) against the model's steps at each
    by_side = {}
    for side in p.sides:
        loader = train_loader(pipes, shards, bs, size=side)
        images, targets = next(iter(loader))
        pair = check.interleaved({"train_loader": (loader.stream(), None),
                                  "model_training_steps": (repeat((images.clone(), targets.clone())),
                                                           check.steps["step"])})
        by_side[side] = {"train_loader": pair["train_loader"], "model_training_steps": pair["model_training_steps"],
                         "loader_vs_steps": round(pair["ratios"]["train_loader"]["model_training_steps"], 3)}
        del loader, images, targets
    return part_result(gates, model=p.model, batch_size=bs, **figures, by_side=by_side)


def training_steps(check: Check) -> dict:
    """The waiting share is 1 - the median of the paired ratios of the fed steps to the steps on one batch."""
    steps, p = check.steps, check.profile
    both = check.interleaved({"dali_fed": (steps["stream"], steps["step"]),
                              "one_batch_on_device": (steps["one_batch"], steps["step"])})
    ratio = both["ratios"]["dali_fed"]["one_batch_on_device"]
    gates = [speed(data_wait(ratio, 1.0, p.max_wait_share), p), *steady(both, p)]
    return part_result(gates, model=p.model, batch_size=p.batch_size,
                       autocast=str(check.amp_dtype).removeprefix("torch.") if check.amp_dtype else None,
                       channels_last=True, dali_fed=both["dali_fed"], one_batch_on_device=both["one_batch_on_device"],
                       data_wait_share=round(data_wait_share(ratio, 1.0), 4), memory=gpu_memory())


def ddp(check: Check) -> dict:
    """Two processes or more through every rank-dependent path: NCCL with a GPU a process where the machine has two
    or more, else two processes sharing one GPU over gloo; the train stage (DDP, a resolution schedule's rebuild on
    every rank, the gathered validation) and the tune stage (one process trains it, choosing the rule and the test
    resolution, while the others leave)."""
    check.demo  # noqa: B018 (builds the data)
    gpus = torch.cuda.device_count() if check.device.kind == "gpu" else 0
    n, backend = (min(gpus, 8), "nccl") if gpus >= 2 else (2, "gloo")
    config = check.demo_config("ddp", {"train": {"epochs": 2, "resolution": SCHEDULE},
                                       "tune": {"epochs": 2, "test_resolutions": [[64, 56], [73, 64]]}})
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
              *check.train_program, "--config", str(config), "--stage"]
    r = check.run_logged([*launch, "train"], "ddp")
    epochs = metrics_epochs(check.work / "ddp" / "artifacts" / "train")
    val = read_manifest(check.work / "demo_shards")["splits"]["val"]["samples"]
    gates = [equal("exit code", r.returncode, 0), equal("epochs recorded", len(epochs), 2),
             equal("crop sides of the epochs (a schedule: each rank rebuilt its pipeline)",
                   [e.get("resolution") for e in epochs], [48, 56])]
    for e in epochs:
        tag = f"epoch {e['epoch']}"
        gates += [equal(f"{tag}: process group", e.get("process_group"), backend),
                  equal(f"{tag}: processes", len(e["samples_per_rank"]), n),
                  equal(f"{tag}: distinct image counts trained on over the ranks", len(set(e["samples_per_rank"])), 1),
                  equal(f"{tag}: validation images gathered from every rank", e["val_images"], val),
                  equal(f"{tag}: loss finite", math.isfinite(e["loss"]), True)]
    if r.returncode or not epochs:
        return part_result(gates, r, processes=n, backend=backend)
    # every rank validated its part with its own replica: with the same weights and BatchNorm statistics on every
    # rank, the gathered figures are those of the saved weights, which one process computes again here, at two
    # batch sizes: how much batching alone moves them (other kernels, another sum order) is the gate's tolerance
    alone = [validation_from_checkpoint(config, check.checkpoint("ddp"), check.device, check.amp_dtype, batch)
             for batch in (64, 37)]
    last, keys = epochs[-1], ("val_gap", "val_f2")
    for key in keys:
        noise = max(abs(a[key] - b[key]) for a in alone for b in alone)
        gates.append(at_most(f"last epoch: {key} of the ranks' replicas against one process on the saved weights "
                             "(absolute difference)", abs(last[key] - alone[0][key]), 2 * noise,
                             f"measured: 2 x the spread of one process's figure over batch sizes 64 and 37 "
                             f"({noise:.3g})" if noise else "exact: one process's figure does not move with batching"))
    # the tune stage under the same processes: one trains it, with one process's batch and steps
    r = check.run_logged([*launch, "tune"], "ddp_tune")
    tune = metrics_epochs(check.work / "ddp" / "artifacts" / "tune")
    report_path = check.work / "ddp" / "artifacts" / "tune" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    data = check.work / "ddp" / "artifacts" / "tune" / "data"
    one_process_steps = (tune_parts(check.work / "demo_shards", data)[0].samples // load_config(config).tune.batch_size
                         if (data / "fit-000000.idx").exists() else None)
    gates += [equal("tune: exit code", r.returncode, 0), equal("tune: epochs recorded", len(tune), 2),
              equal("tune: processes that trained it", sorted({len(e["samples_per_rank"]) for e in tune}), [1]),
              equal("tune: steps an epoch (one process's)", sorted({e["steps"] for e in tune}), [one_process_steps]),
              equal("tune: test resolution chosen among the candidates",
                    report.get("chosen_resolution") in ([64, 56], [73, 64]), True),
              equal("tune: rule's F2 cross-fitted beside the in-sample one",
                    all(k in report for k in ("f2_cross_fitted", "f2_in_sample")), True)]
    return part_result(gates, r if r.returncode else None, processes=n, backend=backend,
                       recorded={k: last[k] for k in keys}, from_saved_weights={k: alone[0][k] for k in keys})


def validation_from_checkpoint(config: Path, checkpoint: Path, device, amp_dtype=None, batch_size: int | None = None
                               ) -> dict:
    """The train stage's validation figures of a saved model, computed by this process alone."""
    from common.distributed import Dist
    from common.runtime import InputAdapter, Runtime
    from common.threads import dali_threads
    from model.checkpoint import load_checkpoint, model_from_checkpoint
    from training.stages import train_stage
    from training.validation import validate
    from dali_pipes.settings import PipeSettings
    cfg = load_config(config, [f"predict.batch_size={batch_size}"] if batch_size else [])
    runtime = Runtime(device, Dist(), amp_dtype, dali_threads(cfg.pipeline.num_threads, device.kind == "gpu"),
                      InputAdapter.from_config(cfg), cfg.pipeline.num_threads)
    pipes = PipeSettings.from_config(cfg, runtime)
    model = model_from_checkpoint(load_checkpoint(checkpoint), cfg.model.channels_last).to(device.torch_device)
    spec = train_stage(cfg, 1)
    return validate(model, spec.data.open()[1], spec.validation, runtime, pipes)


# two crop sides for the training parts' runs on the demo data (its 56-px crops): epoch 1 at 48 px, then 56
SCHEDULE = {"start": 48, "end": 56, "start_epoch": 0, "end_epoch": 1, "step": 8}


def compile_part(check: Check) -> dict:
    """model.compile trains across a change of crop side with one graph per side (torch's own recompile log),
    saves plain weight names and resumes into a freshly compiled model."""
    from model.checkpoint import load_checkpoint
    check.demo  # noqa: B018
    gates = []
    for epochs in (2, 3):  # the second run resumes the first's checkpoint into a freshly compiled model
        # --quick: torch.compile's eager backend (no code generation: seconds instead of minutes on a small CPU)
        model = {"compile": True, **({"compile_backend": "eager"} if check.profile.quick else {})}
        config = check.demo_config("compile", {"model": model, "train": {"epochs": epochs, "resolution": SCHEDULE}},
                                   fresh=epochs == 2)
        # inductor's own cache in the work folder: every run of the check compiles from cold, the second process
        # from the first's cache, so that its seconds compare from machine to machine
        r = check.run_logged(check.train_command("--config", str(config), "--stage", "train"), f"compile_{epochs}",
                             env={"TORCH_LOGS": "recompiles", "TORCHINDUCTOR_CACHE_DIR": str(check.work / "inductor")})
        gates.append(equal(f"train to epoch {epochs}: exit code", r.returncode, 0))
        if r.returncode:
            return part_result(gates, r)
        if epochs == 2:  # 48 px, then 56: one graph each, compiled once and recompiled once, never per step
            gates.append(equal("recompilations over two epochs at two crop sides",
                               r.stderr.count("Recompiling function"), 1))
    saved = load_checkpoint(check.checkpoint("compile"))
    gates += [equal("epochs in last.pt after the resumed run", saved["epoch"], 3),
              equal("weights saved without compile's prefixes (what inference loads)",
                    [k for k in saved["model"] if "_orig_mod" in k or k.startswith("module.")], [])]
    return part_result(gates, backend="eager" if check.profile.quick else "inductor")


def resume(check: Check) -> dict:
    """Two uninterrupted runs (the second measures the device's own nondeterminism), one killed at its first
    mid-epoch checkpoint after a change of crop side, and run again."""
    from model.checkpoint import load_checkpoint
    check.demo  # noqa: B018
    samples = read_manifest(check.work / "demo_shards")["splits"]["train"]["samples"]
    batch = 32 if check.profile.rehearsal else 64
    steps = samples // batch
    # dropout draws random numbers every step and the lr steps after epoch 1: a resume that forgot the random
    # state, the schedule or DALI's position ends elsewhere; fp16 on a GPU so that the GradScaler's state matters;
    # the first mid-epoch checkpoint comes two steps into epoch 2, after the pipeline was rebuilt for 56 px
    changes = {"model": {"drop_rate": 0.3, **({} if check.profile.rehearsal else {"amp_dtype": "float16"})},
               "train": {"epochs": 2, "batch_size": batch, "lr_step_epochs": 1, "log_every": 1,
                         "checkpoint_every_steps": steps + 2, "resolution": SCHEDULE}}
    runs = {name: check.train_command("--config", str(check.demo_config(f"resume_{name}", changes)), "--stage", "train")
            for name in ("clean", "clean_again", "killed")}
    for name in ("clean", "clean_again"):
        r = check.run_logged(runs[name], f"resume_{name}")
        if r.returncode:
            return part_result([equal(f"{name} run: exit code", r.returncode, 0)], r)
    last = check.checkpoint("resume_killed")
    proc = subprocess.Popen(runs["killed"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    read = None  # the version of last.pt read last: each is loaded once
    while proc.poll() is None:  # until last.pt is a mid-epoch one (the end of epoch 1 writes one first)
        version = last.stat().st_mtime_ns if last.exists() else None
        if version not in (None, read):
            read = version
            if mid_epoch(last):
                break
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs, as in a crash
    proc.wait()
    killed_at = load_checkpoint(last) if last.exists() else {}
    step_in_epoch = (killed_at.get("epoch_progress") or {}).get("step", 0)
    r = check.run_logged(runs["killed"], "resume_resumed")
    gates = [equal("killed run: finished epochs in its last.pt (killed in epoch 2, at 56 px)", killed_at.get("epoch"),
                   1),
             at_least("killed run: steps into the epoch in its last.pt (a mid-epoch checkpoint)", step_in_epoch, 1,
                      "exact"),
             equal("resumed run: exit code", r.returncode, 0),
             equal("resumed run says where it resumed", "resuming train" in r.stdout + r.stderr, True)]
    if r.returncode:
        return part_result(gates, r)
    clean, again, resumed = (load_checkpoint(check.checkpoint(f"resume_{name}"))
                             for name in ("clean", "clean_again", "killed"))
    gates += [equal("steps", resumed["step"], clean["step"]),
              weights_match(resumed["model"], clean["model"], again["model"], check.profile.resume_floor)]
    return part_result(gates, killed_at_step=step_in_epoch,
                       autocast=None if check.profile.rehearsal else "float16 with GradScaler")


def mid_epoch(path: Path) -> bool:
    from model.checkpoint import load_checkpoint
    try:
        return bool((load_checkpoint(path).get("epoch_progress") or {}).get("step"))
    except UserError:  # replaced while read
        return False


def image_blind_gap(val_targets: list[list[int]], class_counts: list[int], k: int, seed: int = 0) -> dict:
    """The GAP of predictors blind to the image: training class frequencies (the best a model trained on labels
    shuffled across images can learn) and random scores (an untrained model)."""
    from model.metrics import global_average_precision
    n, c = len(val_targets), len(class_counts)
    prior = np.tile(np.asarray(class_counts, dtype=np.float64), (n, 1))
    prior += np.random.default_rng(seed).random((n, c)) * 1e-6  # ties broken at random, not by class index
    rand = np.random.default_rng(seed + 1).random((n, c))

    def gap(scores):
        idx = np.argsort(-scores, axis=1)[:, :k]
        return float(global_average_precision(idx, np.take_along_axis(scores, idx, 1), val_targets))
    return {"class_frequency": gap(prior), "random": gap(rand)}


def commands(check: Check) -> dict:
    """The README's path on demo data, in this process, with every lever the train and tune stages ship: build
    (done, with machine labels), train (machine labels as soft targets, the fast preset's triangular rate and
    resolution schedule), tune (the unseen-class threshold, the test resolution chosen on the hold-out), a stage-2
    submission, an ENSEMBLE of the tuned and the trained model (inference.ensemble) and its one-pass submission."""
    from inference.ensemble import make_ensemble
    from inference.score import read_labels, score
    from inference.submit import submit
    from model.checkpoint import load_checkpoint
    from training.train import train
    check.demo  # noqa: B018
    cfg = load_config(check.demo_config("commands", {
        "data": {"machine_labels": True},
        "train": {"epochs": 6, "lr_schedule": "triangular", "lr_peak_epoch": 1,
                  "resolution": {"start": 40, "end": 48, "start_epoch": 2, "end_epoch": 4, "step": 8}},
        "tune": {"epochs": 10, "unseen_class_threshold": True, "test_resolutions": [[55, 48], [64, 56]]}}))
    record = train(cfg, "train")
    train(cfg, "tune")
    tuned, trained = (cfg.paths.artifacts / stage / "checkpoints" / "best.pt" for stage in ("tune", "train"))
    summary = submit(cfg, 2, tuned)
    val = shard_truth(split_shards(cfg.paths.shards, "val"))
    blind = image_blind_gap(list(val.values()), read_manifest(cfg.paths.shards)["class_counts"]["train"],
                            cfg.predict.top_k)
    solution = read_labels(cfg.paths.competition_data / "stage_2_solution.csv")
    f2, missing, _ = score(read_labels(Path(summary["submission"])), solution)
    rule = load_checkpoint(tuned).get("decision_rule") or {}
    ensemble_file = cfg.paths.artifacts / "ENSEMBLE"
    made = make_ensemble(cfg, [tuned, trained], ensemble_file)
    together = submit(cfg, 2, ensemble_file)
    ensemble_f2, ensemble_missing, _ = score(read_labels(Path(together["submission"])), solution)
    gates = [at_least("train: validation GAP", record["val_gap"], max(blind.values()) + check.profile.gap_margin,
                      f"design: {check.profile.gap_margin} above the best image-blind predictor, measured here"),
             equal("train: crop sides of the last epochs", record.get("resolution"), 48),
             equal("tune: checkpoint holds a decision rule", bool(rule), True),
             equal("tune: test resolution chosen among the candidates", rule.get("test_resolution") in
                   ([55, 48], [64, 56]), True),
             equal("submission: images predicted", summary["predicted"], summary["images"]),
             equal("submission: solution images missing", missing, 0),
             equal("ensemble: members", together["members"], 2),
             equal("ensemble: hold-out figures, cross-fitted beside in-sample",
                   "ensemble_f2_cross_fitted" in made and "ensemble_f2" in made, True),
             equal("ensemble submission: images predicted", together["predicted"], together["images"]),
             equal("ensemble submission: solution images missing", ensemble_missing, 0)]
    return part_result(gates, val_gap=round(record["val_gap"], 4),
                       image_blind_gap={k: round(v, 4) for k, v in blind.items()},
                       gap_floor_rule=f"best image-blind GAP + {check.profile.gap_margin}",
                       train_images_per_s=round(record["images_per_s"], 1),
                       data_wait_share=round(record["data_wait_share"], 3), stage2_f2=round(f2, 4),
                       ensemble_stage2_f2=round(ensemble_f2, 4), test_resolution=rule.get("test_resolution"))


RUNNERS: dict[str, Callable[[Check], dict]] = dict(zip(PARTS, (parity, throughput, training_steps, ddp, compile_part,
                                                              resume, commands)))


def device_description(check: Check) -> dict:
    import nvidia.dali
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    out = {"kind": check.device.kind, "torch": torch.__version__, "cuda": torch.version.cuda,
           "dali": nvidia.dali.__version__, "cores": usable_cores(), "cpu": cpu}
    if check.device.kind == "gpu":
        out.update(name=torch.cuda.get_device_name(check.device.device_id), gpus=torch.cuda.device_count(),
                   autocast=str(check.amp_dtype).removeprefix("torch."))
    return out


def machine_lacks(device_kind: str, quick: bool) -> list[str]:
    """What this machine lacks for a part of the check, one line each."""
    import sysconfig
    lacks = []
    if device_kind == "gpu":
        if not shutil.which("nvidia-smi"):
            lacks.append("nvidia-smi: the driver's tools; whether the hardware JPEG decoder worked cannot be seen")
        capabilities = os.environ.get("NVIDIA_DRIVER_CAPABILITIES")
        if capabilities is not None and not {"video", "all"} & set(capabilities.split(",")):
            lacks.append(f"the 'video' driver capability (NVIDIA_DRIVER_CAPABILITIES={capabilities}): under the "
                         "NVIDIA container toolkit that hides the hardware JPEG decoder (the throughput part says "
                         "whether it worked)")
    if not quick:  # model.compile with inductor: Triton builds its launcher with a C compiler and Python's headers
        if not (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")):
            lacks.append("a C compiler (cc or gcc, or CC): model.compile's Triton kernels cannot be built (the "
                         "compile part fails)")
        headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
        if not headers.is_file():
            lacks.append(f"Python's headers ({headers}; python3-dev): model.compile's Triton launcher cannot be "
                         "built (the compile part fails)")
    return lacks


# Each part's seconds on one H200 machine (16 cores) per second of the full CPU rehearsal (--rehearse, 2 cores),
# measured on 2026-12-04 (docs/BENCHMARKS.md, "GPU"): the H200 run of every part against the rehearsal of the same
# code. The GPU takes longer than the rehearsal though it computes faster: its profile has more and larger images,
# SE-ResNet101 in the timed parts, and each GPU process pays for CUDA, nvJPEG and cuDNN's per-shape autotuning.
# The profiles were trimmed since (fewer photographs and demo images on the GPU, two windows where there were
# three), which shortens the GPU's side more than the rehearsal's: an estimate from these ratios errs long.
GPU_SECONDS_PER_REHEARSAL_SECOND = {"parity": 3.7, "throughput": 1.66, "training_steps": 1.25, "ddp": 3.3,
                                    "compile": 1.4, "resume": 2.7, "commands": 3.2}


def gpu_estimate(parts: dict) -> dict:
    """From a rehearsal's parts: each part's expected seconds on a GPU machine, and their total."""
    seconds = {name: round(part["seconds"] * GPU_SECONDS_PER_REHEARSAL_SECOND[name], 1)
               for name, part in parts.items() if "seconds" in part}
    return {"seconds_by_part": seconds, "total_seconds": round(sum(seconds.values()), 1),
            "factors": {k: GPU_SECONDS_PER_REHEARSAL_SECOND[k] for k in seconds}}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, metavar="PATH", help="where to write the report")
    parser.add_argument("--rehearse", action="store_true", help="run every part on the CPU, with CPU thresholds")
    parser.add_argument("--quick", action="store_true", help="with --rehearse: small data and short windows")
    parser.add_argument("--only", metavar="PART[,PART]", help=f"run these parts only: {', '.join(PARTS)}")
    parser.add_argument("--work", type=Path, help="keep the data and logs here (default: a temporary folder, "
                                                  "removed at the end)")
    args = parser.parse_args(argv)
    args.parts = PARTS if args.only is None else tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown or not args.parts:
        parser.error((f"unknown part(s) {', '.join(unknown)}" if unknown else "--only names no part")
                     + f"; the parts are {', '.join(PARTS)}")
    if args.quick and not args.rehearse:
        parser.error("--quick goes with --rehearse (a GPU check with short windows would prove nothing)")
    return args


def run_check(profile: Profile, parts: tuple[str, ...], report_path: Path, work: Path,
              train_program: tuple[str, ...] = TRAINING) -> dict:
    """Run ``parts`` in ``work``, writing the report to ``report_path`` after each part; returns the report.
    ``train_program``: what the training children run after ``python`` (and ``torchrun``), ``-m training.train``
    unless a test hands in a program of its own (one with a known bug, to see the gate that notices it)."""
    check = Check(profile, work, train_program)
    lacks = machine_lacks(check.device.kind, profile.quick)
    for line in lacks:
        print(f"this machine lacks {line}", flush=True)
    report = {"passed": False, "rehearsal": profile.rehearsal, "quick": profile.quick,
              "date": time.strftime("%Y-%m-%d %H:%M"), "device": device_description(check),
              "machine_lacks": lacks, "profile": asdict(profile), "parts": {}}
    for name in parts:
        started = time.perf_counter()
        try:
            result = RUNNERS[name](check)
        except Exception as exc:  # one broken part must not hide the others' figures
            result = {"passed": False, "gates": [], "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - started, 1)
        report["parts"][name] = result
        report["passed"] = all(p["passed"] for p in report["parts"].values())
        if profile.rehearsal:
            report["gpu_estimate"] = gpu_estimate(report["parts"])
        harness.write_json(report_path, report)  # after each part: a run cut short keeps what it measured
        failed = [g["name"] for g in result["gates"] if not g["passed"] and g["gated"]]
        verdict = "passed" if result["passed"] else "FAILED: " + ("; ".join(failed) or result.get("error", ""))
        print(f"{name}: {verdict} ({result['seconds']} s)", flush=True)
    if profile.rehearsal:
        print(f"expected on one H100/H200-class GPU: about {report['gpu_estimate']['total_seconds'] / 60:.1f} min "
              "(from these parts' seconds; --quick's figures understate it)", flush=True)
    return report


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.rehearse and not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU that PyTorch can use, and this machine has none "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "--rehearse runs the same parts on the CPU", file=sys.stderr)
        return 2
    try:
        writable_file(args.json, "--json")  # now, not after the first part has run
        if args.work:
            writable_dir(args.work, "--work")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(logging.WARNING)  # the parts' own progress bars and notes would bury the report's lines
    profile = (QUICK if args.quick else REHEARSAL) if args.rehearse else GPU
    work = args.work or Path(tempfile.mkdtemp(prefix="iic_gpu_check_"))
    print(f"data and logs in {work}" + ("" if args.work else " (removed at the end; --work DIR keeps them)"),
          flush=True)
    try:
        report = run_check(profile, args.parts, args.json, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'all gates passed' if report['passed'] else 'some gates FAILED'}; report in {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
