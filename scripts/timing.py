"""Timing for the benchmarks and the GPU check: figures from windows long enough to trust on a shared machine.

Every figure is images/s over ``windows`` windows of at least ``window_s`` seconds each, reported as the median
with min, max and their spread; figures that are compared in a ratio are measured interleaved (A, B, A, B, ...)
so that drift on a shared machine hits both alike, and the ratio is the median of the rounds' paired ratios.
Each figure also records the CPU that other processes took during its windows (Linux): a busy machine gives
figures that look plausible and are not, and ``busy_machine`` says so.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import torch


def sync() -> None:
    """Wait for the GPU's queued work (a window's time must include it); nothing on a CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# From this many cores' worth of other processes' CPU in a window, the machine was not quiet
BUSY_CORES = 0.1


def machine_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used so far (/proc/stat: all but idle and iowait); None
    where there is no /proc."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float | None:
    """CPU seconds used so far by this process and every process below it (the baseline's DataLoader workers,
    a training run's children), from /proc; None where there is no /proc. Each process counts its own CPU and
    its waited-for children's (cutime, cstime): a worker that ends mid-window moves its CPU into its parent's,
    so the tree's sum stays whole."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    try:
        entries = [e for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # a process that ended while being listed
            continue
        pid, fields = int(entry.name), stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: the parent's pid
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime: see below
    total, frontier = 0, [os.getpid()]
    while frontier:  # a process tree: every pid is reached once
        pid = frontier.pop()
        total += ticks.get(pid, 0)
        frontier += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


class OtherProcesses:
    """Cores' worth of CPU that processes other than ours used between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self.machine, self.own, self.wall = machine_cpu_s(), own_cpu_s(), time.perf_counter()

    def stop(self) -> float | None:
        machine, own, wall = machine_cpu_s(), own_cpu_s(), time.perf_counter() - self.wall
        if None in (machine, own, self.machine, self.own) or wall <= 0:
            return None
        return max(0.0, (machine - self.machine) - (own - self.own)) / wall


def summary(rates: list[float], seconds: list[float], n: int, others: list | None = None) -> dict:
    out = {"images_per_s": round(statistics.median(rates), 1), "min": round(min(rates), 1),
           "max": round(max(rates), 1), "spread": round(max(rates) / min(rates), 3), "windows": len(rates),
           "batches_per_window": n, "shortest_window_s": round(min(seconds), 2),
           "per_window": [round(r, 1) for r in rates]}
    if others and None not in others:
        out["other_processes_cores"] = round(max(others), 2)  # the worst window
    return out


def busy_machine(results: dict) -> str | None:
    """A warning when other processes took ``BUSY_CORES`` or more in any window of any figure, else None."""
    worst = {name: r["other_processes_cores"] for name, r in results.items()
             if isinstance(r, dict) and r.get("other_processes_cores") is not None}
    if not worst or max(worst.values()) < BUSY_CORES:
        return None
    name = max(worst, key=worst.get)
    return (f"warning: other processes took up to {worst[name]:.2f} of a core during a timed window ({name}): "
            "these are not a quiet machine's figures; run again when it is")


def window_size(run: Callable[[int], float], window_s: float) -> int:
    """Batches per window, from timed runs that double until one lasts a tenth of a window: a single batch may
    come straight out of the prefetch queue and would size the window many times too long."""
    n = 1
    while (took := run(n)) < window_s / 10:
        n *= 2
    return max(1, math.ceil(n * window_s / took))


def interleaved(streams: dict[str, tuple[Iterator | Callable[[], Iterator], Callable | None]], batch_size: int,
                window_s: float = 2.0, windows: int = 5) -> dict:
    """images/s of each stream over ``windows`` windows of at least ``window_s``, taken in turn, with
    ``ratios[a][b]``: the median over rounds of a's rate over b's. A stream is (batches, a step to run on each
    batch or None); batches may be a factory of fresh iterators instead, which each round calls for a new
    loader (and closes it after its window): on a small shared CPU one instance of a loader ran 12-18% faster
    or slower than an identical one for a whole run (docs/BENCHMARKS.md), so one instance per stream makes
    that luck part of the ratio; new ones every round turn it into noise the median absorbs. Batches per
    window are sized from a warm-up, and a window that ends too soon is run again longer. The device is
    synchronised at a window's end only."""
    def runner(batches, step):
        def run(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                batch = next(batches)
                if step:
                    step(batch)
            sync()
            return time.perf_counter() - start
        return run

    sizes: dict[str, int] = {}
    rates = {name: [] for name in streams}
    seconds = {name: [] for name in streams}
    others = {name: [] for name in streams}
    watch = OtherProcesses()
    for _ in range(windows):
        for name, (source, step) in streams.items():
            fresh = callable(source) and not hasattr(source, "__next__")
            batches = source() if fresh else source
            run = runner(batches, step)
            if fresh or name not in sizes:
                run(2)  # warm-up: buffers, the first batches' allocations, cuDNN's choice of kernels
            if name not in sizes:
                sizes[name] = window_size(run, window_s)
            watch.start()
            took = run(sizes[name])
            while took < window_s:
                sizes[name] = math.ceil(sizes[name] * window_s / took * 1.1)
                took = run(sizes[name])
            others[name].append(watch.stop())
            rates[name].append(sizes[name] * batch_size / took)
            seconds[name].append(took)
            if fresh:
                batches.close()
    out = {name: summary(rates[name], seconds[name], sizes[name], others[name]) for name in streams}
    out["ratios"] = {a: {b: statistics.median(x / y for x, y in zip(rates[a], rates[b])) for b in streams if b != a}
                     for a in streams}
    return out


def timed_windows(batches: Iterator, batch_size: int, window_s: float = 2.0, windows: int = 5,
                  step: Callable | None = None) -> dict:
    """One stream's images/s (see ``interleaved``)."""
    return interleaved({"it": (batches, step)}, batch_size, window_s, windows)["it"]
