#!/usr/bin/env python3
"""Where the train loader's time goes: CPU per batch of each of the process's threads, graph against loader.

    python scripts/benchmark_handover.py [--shards DIR] [--images 2000] [--batch-size 32] [--threads N]
        [--window-s 2] [--windows 9] [--config config.yaml] [--set KEY=VALUE ...] [--json out.json]

Three streams over the same shards: the bare DALI train graph (``pipe.run()``, outputs dropped at once), the
same graph with its outputs held as torch tensors until the next batch is taken (as every consumer holds a
batch while it works on it; nothing else done) and the PyTorch-facing train loader. They take windows in
turn, each window on a new instance (as in benchmark_throughput.py), once with DALI on every core and once with
one DALI thread fewer (the consumer's core, as the thread budget gives training; not with --threads 1).

For each window it reads every thread's CPU clock (Linux) and reports, per batch, the medians of: wall time;
CPU of DALI's worker threads and of its executor thread (with one thread DALI runs the operators on its
executor, so "DALI" is their sum), of the reader's prefetch thread, of the consuming (main) thread and of any
other thread; how busy DALI was (its CPU over its threads x wall: below 1, its threads waited); and the CPU
that other processes took meanwhile (timing.OtherProcesses), with a warning when they took a tenth of a core
or more: figures from a busy machine do not compare. A rate says how fast; this says which thread paid for the
difference, which a throughput figure alone cannot. About 2.5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmark_throughput import REPO, endless, make_shards, pipeline_runs  # noqa: E402 (scripts/)
from common.cli import command  # noqa: E402
from common.config import load_config  # noqa: E402
from common.shard_format import split_shards  # noqa: E402
from dali_pipes.device import resolve_device  # noqa: E402
from dali_pipes.loader import build_train_pipeline, train_loader  # noqa: E402
from timing import OtherProcesses, busy_machine, window_size  # noqa: E402 (scripts/timing.py)
from benchmark_args import at_least_one, positive_seconds, output_file  # noqa: E402 (scripts/)

GROUPS = ("dali_workers", "dali_executor", "reader_prefetch", "consumer", "other")


def group_of(name: str, tid: int) -> str:
    """The role of a thread by its name (DALI names its threads; Linux keeps 15 characters of a name)."""
    if tid == os.getpid():
        return "consumer"
    if name.startswith("[DALI][TP"):
        return "dali_workers"
    if name.startswith("[DALI] Exec"):
        return "dali_executor"
    if name.startswith("PrefetchWorker"):
        return "reader_prefetch"
    return "other"


def thread_cpu() -> dict[int, tuple[str, float]]:
    """Every thread of this process: tid -> (name, CPU seconds so far). Read from the thread's CPU clock
    (nanoseconds) rather than /proc's stat (10 ms ticks: too coarse for the consumer's share of a window)."""
    out = {}
    for entry in os.scandir("/proc/self/task"):
        tid = int(entry.name)
        try:
            name = Path(entry.path, "comm").read_text().rstrip("\n")
            # Linux's per-thread CPU clock id: MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)
            out[tid] = (name, time.clock_gettime(((~tid) << 3) | 6))
        except (FileNotFoundError, ProcessLookupError, OSError):  # a thread that ended while being listed
            continue
    return out


def cpu_by_group(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds each group used between two ``thread_cpu`` snapshots."""
    used = dict.fromkeys(GROUPS, 0.0)
    for tid, (name, seconds) in after.items():
        used[group_of(name, tid)] += seconds - before.get(tid, (name, 0.0))[1]
    return used


def held_outputs(pipe):
    """The graph's outputs as torch tensors (zero-copy views of DALI's buffers), each batch held until the next
    is taken: DALI's hand-over as DALIGenericIterator does it (``share_outputs``, then ``release_outputs`` and
    ``schedule_run``, which on DALI 2's dynamic executor leave the buffers to the torch tensors), nothing else."""
    pipe.schedule_run()  # the first call schedules prefetch_queue_depth runs, as DALIGenericIterator's does
    while True:
        batch = [torch.from_dlpack(out.as_tensor()) for out in pipe.share_outputs()]
        pipe.release_outputs()
        pipe.schedule_run()
        yield batch


def measure_window(make, batches_per_window: int | None, window_s: float) -> dict:
    """One window on a new instance: wall and per-group CPU per batch. Sized from the first window if needed."""
    batches = make()
    try:
        for _ in range(2):  # warm-up: the first batches' allocations
            next(batches)

        def run(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                next(batches)
            return time.perf_counter() - start

        n = batches_per_window or window_size(run, window_s)
        before, others = thread_cpu(), OtherProcesses()
        others.start()
        took = run(n)
        used = cpu_by_group(before, thread_cpu())
        other_cores = others.stop()
    finally:
        batches.close()
    gc.collect()
    return {"batches": n, "wall_s": took, "cpu_s": used, "other_cores": other_cores}


def dali_cpu_s(window: dict) -> float:
    """DALI's CPU in a window: with one thread DALI runs the operators on its executor, so both groups count."""
    return window["cpu_s"]["dali_workers"] + window["cpu_s"]["dali_executor"]


def summarise(windows: list[dict], batch_size: int, threads: int) -> dict:
    per_batch = lambda key: statistics.median(1e3 * key(w) / w["batches"] for w in windows)  # noqa: E731
    out = {"images_per_s": round(statistics.median(w["batches"] * batch_size / w["wall_s"] for w in windows), 1),
           "wall_ms_per_batch": round(per_batch(lambda w: w["wall_s"]), 3),
           "cpu_ms_per_batch": {g: round(per_batch(lambda w, g=g: w["cpu_s"][g]), 3) for g in GROUPS},
           "dali_threads": threads, "windows": len(windows), "batches_per_window": windows[0]["batches"]}
    out["cpu_ms_per_batch"]["total"] = round(per_batch(lambda w: sum(w["cpu_s"].values())), 3)
    out["cpu_ms_per_batch"]["dali"] = round(per_batch(dali_cpu_s), 3)
    # cores' worth of CPU that other processes used during the windows (the worst window): 0 on a quiet machine
    out["other_processes_cores"] = round(max(w["other_cores"] or 0.0 for w in windows), 2)
    # DALI's CPU over what its threads could have had: below 1, they waited (for work, or for a core)
    out["dali_busy"] = round(statistics.median(dali_cpu_s(w) / (threads * w["wall_s"]) for w in windows), 3)
    return out


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="a shard folder made by preprocessing.build_shards")
    parser.add_argument("--images", type=at_least_one, default=2000, help="images to generate when --shards is not given")
    parser.add_argument("--batch-size", type=at_least_one, default=32)
    parser.add_argument("--threads", type=at_least_one, default=os.cpu_count() or 1, help="DALI threads (default: every core)")
    parser.add_argument("--window-s", type=positive_seconds, default=2.0, help="each timed window lasts at least this long")
    parser.add_argument("--windows", type=at_least_one, default=9, help="windows per stream (medians)")
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides (data.* ones also shape the generated shards)")
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args(argv)
    if not Path("/proc/self/task").is_dir():
        sys.exit("error: this benchmark reads each thread's CPU time from /proc/self/task, which only Linux has")
    os.environ.setdefault("IIC_THREAD_BUDGET", "off")  # DALI's threads as given, as in benchmark_throughput.py
    load_config(args.config, args.overrides)  # a wrong key or file: one line now, not after building shards
    with tempfile.TemporaryDirectory(prefix="iic_handover_") as work:
        results = measure(args, Path(work))
    print("\nCPU in ms per batch (medians); DALI = its workers + executor; other = this process's other threads; "
          "busy = DALI's CPU / (threads x wall); other procs = cores' worth of CPU other processes took (worst window)")
    print(f"{'stream':36s} {'images/s':>9s} {'of graph':>8s} {'wall':>6s} {'DALI':>6s} {'prefetch':>8s} "
          f"{'consumer':>8s} {'other':>6s} {'busy':>5s} {'other procs':>11s}")
    for name, r in results["streams"].items():
        cpu = r["cpu_ms_per_batch"]
        graph = results["streams"]["dali_train_pipeline" + ("_spare_core" if name.endswith("_spare_core") else "")]
        print(f"{name:36s} {r['images_per_s']:9.1f} {r['images_per_s'] / graph['images_per_s']:8.2f} "
              f"{r['wall_ms_per_batch']:6.2f} {cpu['dali']:6.2f} {cpu['reader_prefetch']:8.2f} {cpu['consumer']:8.2f} "
              f"{cpu['other']:6.2f} {r['dali_busy']:5.2f} {r['other_processes_cores']:11.2f}")
    if warning := busy_machine(results["streams"]):
        print(warning, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def measure(args, work: Path) -> dict:
    shards_dir = args.shards or make_shards(work, args.images, [o for o in args.overrides if o.startswith("data.")])
    shards = split_shards(shards_dir, "train")
    device = resolve_device("cpu")
    bs = args.batch_size
    torch.set_num_threads(1)  # the consumer as benchmark_throughput.py times it

    def graph(cfg):
        return lambda: pipeline_runs(build_train_pipeline(cfg, shards, 0, 1, bs, device))

    def held(cfg):
        return lambda: held_outputs(build_train_pipeline(cfg, shards, 0, 1, bs, device))

    def loader(cfg):
        return lambda: endless(train_loader(cfg, batch_size=bs, device=device, shards=shards))

    streams, threads_of = {}, {}
    for threads, suffix in ((args.threads, ""), (args.threads - 1, "_spare_core")):
        if threads < 1:
            continue
        cfg = load_config(args.config, [f"paths.shards={shards_dir}", f"pipeline.num_threads={threads}",
                                        "pipeline.device=cpu", "model.channels_last=false", *args.overrides])
        named = {f"dali_train_pipeline{suffix}": graph(cfg), f"dali_train_pipeline_held{suffix}": held(cfg),
                 f"dali_train{suffix}": loader(cfg)}
        streams |= named
        threads_of |= dict.fromkeys(named, threads)
    sizes: dict[str, int] = {}
    windows = {name: [] for name in streams}
    for _ in range(args.windows):  # in turn, a new instance each window: drift and instance luck hit all alike
        for name, make in streams.items():
            w = measure_window(make, sizes.get(name), args.window_s)
            sizes[name] = w["batches"]
            windows[name].append(w)
    return {"streams": {name: summarise(w, bs, threads_of[name]) for name, w in windows.items()},
            "setup": {"batch_size": bs, "threads": args.threads, "images": shards.samples, "cpu_count": os.cpu_count(),
                      "window_s": args.window_s, "windows": args.windows}}


if __name__ == "__main__":
    main()
