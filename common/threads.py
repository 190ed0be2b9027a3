"""The thread budget: how many threads DALI, PyTorch and OpenCV each get, from the cores this process may use.

Left alone, each library starts one thread per core of the machine: on 2 cores DALI's 2 decoding threads,
PyTorch's 2 intra-op threads (OpenMP, which spin while they wait) and OpenCV's fight for 2 cores, and one
busy core elsewhere makes training 20x slower (issue 16: 32-41 images/s instead of 690-780). So:

- the cores are the ones this process may run on (``os.sched_getaffinity``: a container's or ``taskset``'s
  limit, not the machine's count), shared equally by the processes torchrun starts on this machine;
- on the CPU, DALI decodes while the model computes, so they split the cores (DALI at most
  ``pipeline.num_threads``, and at most half) and together never exceed them;
- on a GPU the model's work is on the GPU: DALI gets up to ``pipeline.num_threads`` of this process's cores
  (reading, the host half of nvJPEG's decoding) less one for PyTorch, which only launches kernels;
- OpenCV (the shard builder's resize) runs one thread per builder worker process.

``IIC_THREAD_BUDGET=off`` leaves every library at its defaults (for comparison; docs/BENCHMARKS.md, "Thread budget").
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The cores this process may run on, shared by the processes torchrun started on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def budget_enabled() -> bool:
    return os.environ.get("IIC_THREAD_BUDGET", "on").lower() not in ("off", "0", "false")


@dataclass(frozen=True)
class ThreadBudget:
    dali: int
    torch: int
    opencv: int = 1


def thread_budget(requested_dali: int, on_gpu: bool, cores: int | None = None) -> ThreadBudget:
    cores = cores or usable_cores()
    if on_gpu:
        dali = max(1, min(requested_dali, cores - 1))
        return ThreadBudget(dali=dali, torch=max(1, min(4, cores - dali)))
    dali = max(1, min(requested_dali, cores // 2))
    return ThreadBudget(dali=dali, torch=max(1, cores - dali))


def dali_threads(requested: int, on_gpu: bool) -> int:
    """DALI's threads for one pipeline (each holds its own decoder buffers: more than the budget gains nothing)."""
    if not budget_enabled():
        return max(1, min(requested, os.cpu_count() or 1))
    return thread_budget(requested, on_gpu).dali


def apply_thread_budget(requested_dali: int, on_gpu: bool) -> ThreadBudget | None:
    """Set PyTorch's (and, where loaded, OpenCV's) threads for this process; returns the budget."""
    if not budget_enabled():
        return None
    budget = thread_budget(requested_dali, on_gpu)
    import torch
    torch.set_num_threads(budget.torch)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(budget.opencv)
    log.debug("threads: DALI %d, PyTorch %d, OpenCV %d on %d core(s)", budget.dali, budget.torch, budget.opencv,
              usable_cores())
    return budget
