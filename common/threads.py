"""The thread budget: how many threads DALI, PyTorch and OpenCV each get, from the cores this process may use.

Left alone, each library starts one thread per core of the machine: on 2 cores DALI's 2 decoding threads,
PyTorch's 2 intra-op threads (OpenMP, which spin while they wait) and OpenCV's fight for 2 cores, and one
busy core elsewhere makes training 20x slower (issue 16: 32-41 images/s instead of 690-780). So:

- the cores are the ones this process may use (``cpu_limit``: ``os.sched_getaffinity``, i.e. ``taskset``'s or a
  cpuset's limit, and a container's CPU quota, cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; not the
  machine's count), shared equally by the processes torchrun starts on this machine;
- on the CPU, DALI decodes while the model computes, so they split the cores (DALI at most
  ``pipeline.num_threads``, and at most half) and together never exceed them;
- on a GPU the model's work is on the GPU: DALI gets up to ``pipeline.num_threads`` threads for each pipeline
  (reading, the host half of nvJPEG's decoding), counted twice since its mixed decoder runs a thread pool of as
  many beside the pipeline's, within this process's cores less one for PyTorch, which only launches kernels;
- OpenCV (the shard builder's resize) runs one thread per builder worker process.

``IIC_THREAD_BUDGET=off`` leaves every library at its defaults (for comparison; docs/BENCHMARKS.md, "Thread budget").
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs the cgroup quota allows this process (quota / period, the tightest of its cgroup and those above
    it), None without a quota. cgroup v2's ``cpu.max`` ("max 100000" or "200000 100000"), else v1's
    ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us``."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    own = {ctrl: path for _, ctrls, path in (line.split(":", 2) for line in lines if line.count(":") >= 2)
           for ctrl in ctrls.split(",")}
    limits = []
    for base, relative, read in ((root, own.get("", "/"), _v2_limit), (root / "cpu", own.get("cpu", "/"), _v1_limit),
                                 (root / "cpu,cpuacct", own.get("cpu", "/"), _v1_limit)):
        folder = base / relative.lstrip("/")
        for level in (folder, *folder.parents):  # a container sees its own cgroup as the root
            if level == base.parent:
                break
            if (limit := read(level)) is not None:
                limits.append(limit)
    return min(limits, default=None)


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def cpu_limit() -> int:
    """The CPUs this process may use: its affinity, and a container's CPU quota rounded down; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cores, math.floor(quota)) if quota is not None else cores)


def usable_cores(processes: int | None = None) -> int:
    """The CPUs this process may use, shared by ``processes`` processes on this machine (default: as many as
    torchrun started here)."""
    return max(1, cpu_limit() // max(1, processes or int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def worker_count(asked: int | None, flag: str = "--workers") -> int:
    """A pool's size: ``asked``, or every CPU this process may use; more than those is allowed, with a warning."""
    limit = cpu_limit()
    if asked is None:
        return limit
    if asked > limit:
        log.warning("%s %d is more than the %d CPU(s) this process may use (affinity and CPU quota): the workers "
                    "will share them", flag, asked, limit)
    return asked


def budget_enabled() -> bool:
    return os.environ.get("IIC_THREAD_BUDGET", "on").lower() not in ("off", "0", "false")


@dataclass(frozen=True)
class ThreadBudget:
    dali: int
    torch: int
    opencv: int = 1


def thread_budget(requested_dali: int, on_gpu: bool, cores: int | None = None) -> ThreadBudget:
    cores = cores or usable_cores()
    if on_gpu:  # the mixed decoder runs a pool of as many threads again beside the pipeline's own
        dali = max(1, min(requested_dali, (cores - 1) // 2))
        return ThreadBudget(dali=dali, torch=max(1, min(4, cores - 2 * dali)))
    dali = max(1, min(requested_dali, cores // 2))
    return ThreadBudget(dali=dali, torch=max(1, cores - dali))


def dali_threads(requested: int, on_gpu: bool, processes: int | None = None) -> int:
    """DALI's threads for one pipeline (each holds its own decoder buffers: more than the budget gains nothing)."""
    if not budget_enabled():
        return max(1, min(requested, cpu_limit()))
    return thread_budget(requested, on_gpu, usable_cores(processes)).dali


def apply_thread_budget(requested_dali: int, on_gpu: bool, processes: int | None = None) -> ThreadBudget | None:
    """Set PyTorch's (and, where loaded, OpenCV's) threads for this process, one of ``processes`` on this machine
    (default: as many as torchrun started here); returns the budget."""
    if not budget_enabled():
        return None
    cores = usable_cores(processes)
    budget = thread_budget(requested_dali, on_gpu, cores)
    import torch
    torch.set_num_threads(budget.torch)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(budget.opencv)
    log.debug("threads: DALI %d, PyTorch %d, OpenCV %d on %d core(s)", budget.dali, budget.torch, budget.opencv,
              cores)
    return budget
