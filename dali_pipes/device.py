"""Pick where the pipelines run: ``pipeline.device`` is auto, gpu or cpu."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from common.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipeDevice:
    kind: str  # "gpu" or "cpu"
    device_id: int | None  # DALI's device_id: None runs a CPU-only pipeline

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.device_id) if self.kind == "gpu" else torch.device("cpu")


def resolve_device(choice: str, local_rank: int | None = None, announce: bool = False) -> PipeDevice:
    """``auto`` takes the GPU when CUDA is available; ``gpu`` without one is an error."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    has_gpu = torch.cuda.is_available()
    if choice == "gpu" and not has_gpu:
        raise UserError("pipeline.device is 'gpu' but CUDA is not available (use 'auto' or 'cpu')")
    kind = "gpu" if choice == "gpu" or (choice == "auto" and has_gpu) else "cpu"
    device = PipeDevice(kind, local_rank if kind == "gpu" else None)
    if announce:
        where = f"GPU {local_rank} ({torch.cuda.get_device_name(local_rank)})" if kind == "gpu" else "the CPU"
        log.info("DALI pipelines run on %s (pipeline.device=%s)", where, choice)
    return device
