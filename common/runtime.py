"""What a command runs on, built once at its start and handed to the work: the device, the process group, the
autocast dtype, the thread budget and the adapter from a loader's batches to the model's input. Training (both
stages), submissions and ensembles start it the same way:

    with start_runtime(cfg, distributed=True) as runtime:
        ...  runtime.device, runtime.dist, runtime.amp_dtype, runtime.dali_threads, runtime.to_input(images)
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from common import distributed
from common.device import Device, resolve_device
from common.distributed import Dist
from common.threads import apply_thread_budget, dali_threads


def autocast_dtype(on_gpu: bool, enabled: bool, choice: str = "auto") -> torch.dtype | None:
    """Mixed precision on the GPU (``model.amp``, ``model.amp_dtype``): ``auto`` is bf16 where supported, else
    fp16 (trained with a GradScaler); None (fp32) on the CPU."""
    if not on_gpu or not enabled:
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


@functools.lru_cache(maxsize=8)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel shift and scale on 0..255 pixels, made once per device rather than per batch."""
    return (torch.tensor([255 * m for m in mean], device=device),
            torch.tensor([1 / (255 * s) for s in std], device=device))


@dataclass(frozen=True)
class InputAdapter:
    """The one adapter from a loader's images to the model's input: normalised float, NCHW-shaped, channels-last
    in memory exactly when ``channels_last``, on the images' device.

    uint8 crops (``[..., H, W, C]``, from a CPU pipeline) are normalised here, where the model runs; float batches
    (normalised by DALI) pass through, HWC ones as channels-last views (no copy)."""
    mean: tuple
    std: tuple
    channels_last: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            mean, scale = _normalisation(self.mean, self.std, images.device)
            images = ((images.float() - mean) * scale).movedim(-1, -3)
            return images if self.channels_last else images.contiguous()
        return images.movedim(-1, -3) if self.channels_last else images

    @classmethod
    def from_config(cls, cfg) -> "InputAdapter":
        return cls(tuple(cfg.pipeline.mean), tuple(cfg.pipeline.std), cfg.model.channels_last)


@dataclass(frozen=True)
class Runtime:
    device: Device
    dist: Dist
    amp_dtype: torch.dtype | None  # autocast's dtype; None: fp32
    dali_threads: int  # each DALI pipeline's threads, within this process's share of the cores
    to_input: InputAdapter
    requested_dali_threads: int  # pipeline.num_threads, which the budget may have lowered

    @property
    def on_gpu(self) -> bool:
        return self.device.kind == "gpu"

    def main_alone(self) -> "Runtime | None":
        """The runtime of work done on one process whatever the launcher started (``common.distributed.main_alone``):
        rank 0's, with the cores that the processes of its machine shared, None on every other rank."""
        if not self.dist.active:
            return self
        alone = distributed.main_alone(self.dist)
        if alone is None:
            return None
        return replace(self, dist=alone, dali_threads=budgeted_dali_threads(self.requested_dali_threads, self.on_gpu,
                                                                            processes=1))


def budgeted_dali_threads(requested: int, on_gpu: bool, processes: int | None = None) -> int:
    """Set this process's thread budget (``common.threads``); DALI's threads per pipeline within it."""
    budget = apply_thread_budget(requested, on_gpu, processes)
    return budget.dali if budget else dali_threads(requested, on_gpu, processes)


@contextlib.contextmanager
def start_runtime(cfg, distributed_run: bool = False, announce: bool = True) -> Iterator[Runtime]:
    """The command's runtime from its config (``distributed_run``: join the process group torchrun describes, if
    any); the process group is left when the block ends."""
    device = resolve_device(cfg.pipeline.device, announce=announce)
    threads = budgeted_dali_threads(cfg.pipeline.num_threads, device.kind == "gpu")
    d = distributed.setup(device) if distributed_run else Dist()
    try:
        yield Runtime(device, d, autocast_dtype(device.kind == "gpu", cfg.model.amp, cfg.model.amp_dtype), threads,
                      InputAdapter.from_config(cfg), cfg.pipeline.num_threads)
    finally:
        distributed.teardown(d)
