"""What every benchmark shares: timed windows, interleaving, argument types, JSON, a bar plot, generated shards.

Every figure is images/s over ``windows`` windows of at least ``window_s`` seconds each, reported as the median
with min, max and their spread. Figures that are compared in a ratio are measured interleaved (A, B, A, B, ...)
so that drift on a shared machine hits both alike, and the ratio is the median of the rounds' paired ratios.
A stream may be a factory of fresh iterators: each window then runs on a new loader, so that one instance's
luck (on a small shared CPU an instance ran 12-18% off an identical one for its whole life) becomes noise the
median absorbs instead of part of a ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import runpy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from common.atomic import atomic_write_text
from common.errors import UserError
from common.paths import writable_file

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ timing

def sync() -> None:
    """Wait for the GPU's queued work (a window's time must include it); nothing on a CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def summary(rates: list[float], seconds: list[float], n: int) -> dict:
    return {"images_per_s": round(statistics.median(rates), 1), "min": round(min(rates), 1),
            "max": round(max(rates), 1), "spread": round(max(rates) / min(rates), 3), "windows": len(rates),
            "batches_per_window": n, "shortest_window_s": round(min(seconds), 2),
            "per_window": [round(r, 1) for r in rates]}


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
    batch or None); batches may be a factory, called for a new iterator every window (and closed after it).
    Batches per window are sized from a warm-up, and a window that ends too soon is run again longer. The
    device is synchronised at a window's end only."""
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
    for _ in range(windows):
        for name, (source, step) in streams.items():
            fresh = callable(source) and not hasattr(source, "__next__")
            batches = source() if fresh else source
            run = runner(batches, step)
            if fresh or name not in sizes:
                run(2)  # warm-up: buffers, the first batches' allocations, cuDNN's choice of kernels
            if name not in sizes:
                sizes[name] = window_size(run, window_s)
            took = run(sizes[name])
            while took < window_s:
                sizes[name] = math.ceil(sizes[name] * window_s / took * 1.1)
                took = run(sizes[name])
            rates[name].append(sizes[name] * batch_size / took)
            seconds[name].append(took)
            if fresh:
                batches.close()
    out = {name: summary(rates[name], seconds[name], sizes[name]) for name in streams}
    out["ratios"] = {a: {b: statistics.median(x / y for x, y in zip(rates[a], rates[b])) for b in streams if b != a}
                     for a in streams}
    return out


def timed_windows(batches: Iterator, batch_size: int, window_s: float = 2.0, windows: int = 5,
                  step: Callable | None = None) -> dict:
    """One stream's images/s (see ``interleaved``)."""
    return interleaved({"it": (batches, step)}, batch_size, window_s, windows)["it"]


def endless(loader):
    """Batches across epoch boundaries; closing it closes the loader (stopping its workers)."""
    try:
        while True:
            yield from loader
    finally:
        if hasattr(loader, "close"):
            loader.close()


def pipeline_runs(pipe):
    """A DALI graph alone: ``pipe.run()`` with no hand-over to PyTorch (the windows sync the GPU)."""
    while True:
        pipe.run()
        yield None


# ------------------------------------------------------------------------------------------- arguments

def at_least_one(text: str) -> int:
    """A whole number of at least 1 (windows, repeats, images, threads, steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: at least 1")
    return value


def positive_seconds(text: str) -> float:
    """A duration of more than 0 seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: must be more than 0")
    return value


def output_file(text: str) -> Path:
    """A file the results can be written to, checked now rather than after a run of minutes."""
    try:
        return writable_file(Path(text), "the path")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser(prog: str, doc: str, windows: int | None = None) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as --help, --json, and (``windows``) --windows/--window-s."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=output_file, metavar="PATH", help="write every figure here (checked first)")
    if windows:
        p.add_argument("--windows", type=at_least_one, default=windows, help="timed windows per figure (median, "
                       f"min, max; default {windows})")
        p.add_argument("--window-s", type=positive_seconds, default=2.0,
                       help="each timed window lasts at least this long (default 2)")
    return p


def write_json(path: Path | None, result: dict) -> None:
    if path:
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def bar_plot(path: Path, bars: dict[str, float], ylabel: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(bars), list(bars.values()), color=["grey", "tab:green", "tab:blue", "tab:red"][:len(bars)])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- data

def photo_shards(work: Path, images: int, overrides: list[str] = ()) -> Path:
    """Shards of ``images`` photographs (256-px short side, q95) under ``work``, built by the project's own
    builder with config.yaml's data settings and ``overrides``."""
    from common.config import load_config
    from benchmarks.photos import write_photo_dataset
    from preprocessing.build_shards import build_shards
    layout = write_photo_dataset(work / "data", images)
    cfg = load_config(REPO / "config.yaml", [f"paths.original_images={layout.original_images}",
                                             f"paths.competition_data={layout.competition_data}",
                                             f"paths.shards={work / 'shards'}", "data.shard_max_samples=250",
                                             "data.val_fraction=0.1", *overrides])
    build_shards(cfg)
    return work / "shards"


# ------------------------------------------------------------------------------------- the demo's commands

DEMO_CONFIG = REPO / "demo" / "config.yaml"


def run(module: str, *args: str, processes: int | None = None) -> str:
    """One of the project's commands, as a user runs it (``processes``: training under scripts/train.sh with that
    many); its stdout. A failure is one line naming the command and its last error line."""
    import os
    import subprocess
    command = ([sys.executable, "-m", module, *args] if processes is None else
               ["bash", str(REPO / "scripts" / "train.sh"), "--nproc-per-node", str(processes), "--", *args])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise UserError(f"{' '.join(command[-len(args) - 2:])} failed: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout


def demo_settings(work: Path, artifacts: Path, *extra: str, config: Path = DEMO_CONFIG) -> list[str]:
    """``--config demo/config.yaml`` (or ``config``) with the demo data under ``work``, outputs under ``artifacts``,
    and ``extra`` ``--set`` values."""
    paths = {"original_images": work / "data" / "original_images", "competition_data": work / "data" / "inclusive",
             "shards": work / "shards", "artifacts": artifacts, "output": artifacts / "output"}
    return ["--config", str(config), *[a for k, v in paths.items() for a in ("--set", f"paths.{k}={v}")],
            *[a for e in extra for a in ("--set", e)]]


def stage2_f2(work: Path, artifacts: Path, checkpoint: Path, *extra: str) -> float:
    """The stage-2 F2 of a checkpoint on the demo data, submitted and scored by the project's commands."""
    run("inference.submit", *demo_settings(work, artifacts, *extra), "--stage", "2", "--checkpoint", str(checkpoint))
    out = run("inference.score", str(artifacts / "output" / "submission_stage2.csv"),
              str(work / "data" / "inclusive" / "stage_2_solution.csv"))
    return float(out.split()[2])


def metrics_epochs(stage_dir: Path) -> list[dict]:
    """A stage's epoch records from its metrics.jsonl (none where it has none)."""
    path = stage_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in (json.loads(line) for line in lines if line.strip()) if "val_gap" in e]


def tune_figures(work: Path, artifacts: Path) -> dict:
    """A finished tune stage's hold-out figures (its rule's F2 on the images that chose it, and cross-fitted) and
    its best.pt's stage-2 F2 on the demo data."""
    report = json.loads((artifacts / "tune" / "report.json").read_text())
    return {"tune_holdout_f2_in_sample": report["f2_in_sample"],
            "tune_holdout_f2_cross_fitted": report["f2_cross_fitted"],
            "stage2_f2": round(stage2_f2(work, artifacts, artifacts / "tune" / "checkpoints" / "best.pt"), 4)}


def scratch_folder(marker: str) -> Callable[[str], Path]:
    """An argument type: a folder the benchmark may empty (new, empty, or holding its ``marker`` file)."""
    def folder(text: str) -> Path:
        path = Path(text)
        if path.exists() and any(path.iterdir()) and not (path / marker).exists():
            raise argparse.ArgumentTypeError(f"{path} holds files this benchmark did not make; it would empty it: "
                                             "name a new or empty folder")
        return path
    return folder


def fresh_scratch(path: Path, marker: str) -> Path:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / marker).touch()
    return path


def moved(module: str, old: str, args: tuple[str, ...] = (), renamed: dict[str, str] | None = None) -> None:
    """Run ``python -m module`` for a script that moved there (``args`` first, its old flags ``renamed``), with a
    one-line warning."""
    print(f"warning: scripts/{Path(old).name} is now python -m {' '.join([module, *args])}; the old name still "
          "works but will go", file=sys.stderr)
    sys.argv = [module, *args, *((renamed or {}).get(a, a) for a in sys.argv[1:])]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
