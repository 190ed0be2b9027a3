"""Process-group setup for torchrun (NCCL on GPUs, gloo on CPUs) and the few collectives training needs."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # a process group is set up (torchrun), even one of a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """DDP and the collectives run: under torchrun, whatever the number of processes, so that a one-GPU
        torchrun run (``scripts/train.sh`` on one GPU, ``python -m benchmarks.gpu_check``) exercises the same code as eight."""
        return self.group


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def backend_for(on_gpu: bool, processes_here: int, gpus_here: int) -> str:
    """NCCL where each process of this machine has a GPU of its own; gloo on CPUs, and where processes share a GPU
    (NCCL refuses two ranks on one device; gloo's collectives take CUDA tensors too, through the host): two
    processes on a one-GPU machine run every multi-rank path of a real run, slower."""
    return "nccl" if on_gpu and processes_here <= gpus_here else "gloo"


def die_with_launcher() -> None:
    """A rank ends when the process that started it (torchrun's agent) ends, even by SIGKILL, which runs no handler
    to stop the ranks: left running they would go on writing the run's folder beside the next run (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing)."""
    import ctypes
    import signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request took
        os.kill(os.getpid(), signal.SIGTERM)


def setup(device) -> Dist:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1, alone."""
    if not launched_by_torchrun():
        return Dist()
    die_with_launcher()
    world_size = int(os.environ["WORLD_SIZE"])
    on_gpu = device.kind == "gpu"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(device.device_id)  # not always local_rank: see common.device.gpu_index
    if not dist.is_initialized():
        backend = backend_for(on_gpu, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                              torch.cuda.device_count() if on_gpu else 0)
        if on_gpu and backend == "gloo" and local_rank == 0:
            log.warning("%s processes share this machine's %d GPU(s): their process group is gloo (NCCL needs a GPU "
                        "a process), which is slower", os.environ.get("LOCAL_WORLD_SIZE"), torch.cuda.device_count())
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), world_size, local_rank, group=True)


def gather_objects(d: Dist, obj) -> list:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not d.active:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce(d: Dist, tensor: torch.Tensor, op: str = "sum") -> None:
    """In place, over every rank (nothing without a process group)."""
    if d.active:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])


def backend(d: Dist) -> str | None:
    """The process group's backend (nccl, gloo), None without one."""
    return dist.get_backend() if d.active else None


def broadcast_buffers(d: Dist, model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank."""
    if d.active:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def main_alone(d: Dist) -> Dist | None:
    """Work that runs on one process whatever the launcher started: every rank leaves the process group, rank 0
    goes on as a process of its own (``Dist()``), the others get None and end (torchrun waits for rank 0)."""
    if not d.active:
        return d
    barrier(d)
    teardown(d)
    return Dist() if d.is_main else None


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
