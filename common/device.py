"""Where a command's pipelines and model run: ``pipeline.device`` is auto, gpu or cpu."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

import torch

from common.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    kind: str  # "gpu" or "cpu"
    device_id: int | None  # DALI's device_id: None runs a CPU-only pipeline

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.device_id) if self.kind == "gpu" else torch.device("cpu")


def gpus_seen_by_the_driver() -> int:
    """How many GPUs ``nvidia-smi`` lists (0 without a driver)."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def gpu_index(local_rank: int, visible: int) -> int:
    """This process's GPU: its local rank when it sees every GPU of the machine; when a launcher gives each
    process only its own (``CUDA_VISIBLE_DEVICES`` per rank), local rank 3 sees one GPU, index 0."""
    return local_rank if local_rank < visible else local_rank % max(visible, 1)


def resolve_device(choice: str, local_rank: int | None = None, announce: bool = False) -> Device:
    """``auto`` takes the GPU when CUDA is available; ``gpu`` without one is an error, and so is ``auto`` when the
    driver sees GPUs that this PyTorch cannot use (running on the CPU instead would be a silent 50x slowdown)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    has_gpu = torch.cuda.is_available()
    if choice != "cpu" and not has_gpu:
        if choice == "gpu":
            raise UserError("pipeline.device is 'gpu' but CUDA is not available (use 'auto' or 'cpu')")
        if (seen := gpus_seen_by_the_driver()):
            raise UserError(f"nvidia-smi sees {seen} GPU(s) but this PyTorch ({torch.__version__}, built for CUDA "
                            f"{torch.version.cuda}) cannot use them: the driver is probably older than that CUDA "
                            "needs (see 'Installing' in the README), or set pipeline.device: cpu to run on the CPU")
    kind = "gpu" if choice == "gpu" or (choice == "auto" and has_gpu) else "cpu"
    device = Device(kind, gpu_index(local_rank, torch.cuda.device_count()) if kind == "gpu" else None)
    if announce:
        where = f"GPU {device.device_id} ({torch.cuda.get_device_name(device.device_id)})" if kind == "gpu" else "the CPU"
        log.info("DALI pipelines run on %s (pipeline.device=%s)", where, choice)
    return device
