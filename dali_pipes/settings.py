"""What the loaders need to know, and nothing more: made from the config at a command's edge."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.device import Device, resolve_device
from common.seeds import training_seed
from common.threads import dali_threads


@dataclass(frozen=True)
class PipeSettings:
    device: Device
    threads: int  # DALI's threads per pipeline
    prefetch_queue_depth: int
    shuffle_buffer: int  # the train reader's shuffle buffer (DALI's initial_fill)
    shortest_side: int  # data.shortest_side: the short side of the shards' images and of resized test images
    crop_size: int
    augmentation: str  # crop_flip | random_resized_crop
    dtype: str  # auto | float16 | float32 | uint8 (``dali_pipes.loader.output_dtype``)
    amp_dtype: torch.dtype | None  # the model's autocast dtype, which ``auto`` follows
    channels_last: bool  # float batches HWC (True) or CHW
    mean: tuple
    std: tuple
    seed: int  # the training run's seed (readers' shuffles, augmentation)

    @property
    def on_gpu(self) -> bool:
        return self.device.kind == "gpu"

    @classmethod
    def from_config(cls, cfg, runtime=None, device: Device | None = None, amp_dtype: torch.dtype | None = None
                    ) -> "PipeSettings":
        """The config's pipeline keys with the runtime's device, autocast dtype and DALI threads; without a runtime
        (tools and tests), ``device`` or the configured one, ``amp_dtype`` and the thread budget's DALI threads."""
        device = runtime.device if runtime else device or resolve_device(cfg.pipeline.device)
        p = cfg.pipeline
        return cls(device=device,
                   threads=runtime.dali_threads if runtime else dali_threads(p.num_threads, device.kind == "gpu"),
                   prefetch_queue_depth=p.prefetch_queue_depth, shuffle_buffer=p.shuffle_buffer,
                   shortest_side=cfg.data.shortest_side, crop_size=p.crop_size, augmentation=p.augmentation,
                   dtype=p.dtype, amp_dtype=runtime.amp_dtype if runtime else amp_dtype,
                   channels_last=cfg.model.channels_last, mean=tuple(p.mean), std=tuple(p.std),
                   seed=training_seed(cfg))


@dataclass(frozen=True)
class ResolutionSchedule:
    """Each epoch's crop side in pixels (FFCV's ramp): ``start`` up to ``start_epoch``, ``end`` from ``end_epoch``,
    linear between, rounded to multiples of ``step``. Epochs count from 0. The crops are always the same window of
    the image (``pipeline.crop_size`` of its short side), resized to the epoch's side: a low-resolution epoch sees
    the field of view the original does, at fewer pixels."""
    start: int
    end: int
    start_epoch: int = 0
    end_epoch: int = 0
    step: int = 32

    def __call__(self, epoch: int) -> int:
        if epoch <= self.start_epoch:
            return self.start
        if epoch >= self.end_epoch:
            return self.end
        side = np.interp(epoch, [self.start_epoch, self.end_epoch], [self.start, self.end])
        return int(min(self.end, max(self.start, round(side / self.step) * self.step)))

    def sizes(self, epochs: int) -> list[int]:
        """The sides of ``epochs`` epochs, each once, in the order they come."""
        return list(dict.fromkeys(self(e) for e in range(epochs)))

    def resizes(self, epochs: int, window: int) -> bool:
        """Whether any of ``epochs`` epochs' crops differ from the ``window``: then the train graph resizes every
        crop (one graph for every size, so that DALI's state passes from one size's pipeline to the next)."""
        return any(side != window for side in self.sizes(epochs))

    @classmethod
    def from_config(cls, cfg, final_only: bool = False) -> "ResolutionSchedule":
        """``train.resolution``'s schedule (``final_only``: its last side throughout, as the tune stage trains),
        else ``pipeline.crop_size`` throughout."""
        r, crop = cfg.train.resolution, cfg.pipeline.crop_size
        if r is None:
            return cls(crop, crop)
        return cls(r.end, r.end) if final_only else cls(**r.model_dump())
