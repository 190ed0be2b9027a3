"""Throughput of the DALI pipelines against the original PyTorch loader, in one run on the same shards.

    python -m benchmarks.throughput [--shards DIR] [--device cpu|gpu] [--batch-size 32] [--threads N]
        [--images 2000] [--model resnet18] [--skip-training] [--json out.json] [--plot out.png]

Measures (1) the decode-only ceiling (DALI reading + decoding alone, same threads),
(2) the bare DALI train pipeline (``pipe.run()``) and the same pipeline through the
PyTorch-facing loader, (3) the baseline DataLoader/PIL/torchvision loader (``benchmarks.baseline``) with as
many workers as threads, (4) the eval pipeline, and (5) training steps/s of a timm model fed
by DALI and by the baseline. Each figure: the median (with min, max) of --windows timed
windows of at least --window-s seconds; the loaders take their windows in turn, and so do the two
training-step figures, so each ratio is the median of the rounds' paired ratios; each window runs on a new
loader (``benchmarks.harness``). The headline pair (train loader, baseline) is measured on its own afterwards,
with --headline-windows. Without --shards it builds shards of photographs (256-px short side, JPEG q95) with
the project's own shard builder. ``python -m benchmarks.figures --runs A.json B.json C.json`` writes a set of
runs into README.md and docs/BENCHMARKS.md.
"""
from __future__ import annotations

import gc
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.baseline import baseline_loader
from benchmarks.harness import (REPO, at_least_one, bar_plot, endless, interleaved, parser, photo_shards,
                                output_file, pipeline_runs, write_json)
from common.cli import command
from common.config import load_config
from common.shard_format import split_shards
from common.threads import usable_cores
from common.device import resolve_device
from common.runtime import InputAdapter, autocast_dtype
from dali_pipes.loader import build_train_pipeline, eval_loader, output_dtype, train_loader
from dali_pipes.pipelines import decode_only_pipeline
from dali_pipes.settings import PipeSettings


def training_step_fn(model_name: str, num_classes: int, device, cfg, amp_dtype):
    """``step_with(to_input)``: training's own step (``training.train.training_step``: autocast with the GPU's
    dtype, the scaler) on a model laid out as training lays it out, for batches that ``to_input`` turns into
    the model's input."""
    from model.network import create_model
    from training.losses import per_positive_softmax_loss
    from training.train import training_step
    model = create_model(model_name, num_classes, cfg.model.channels_last).to(device.torch_device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def step_with(to_input):
        def step(batch):
            images, targets = (t.to(device.torch_device, non_blocking=True) for t in batch[:2])
            training_step(model, opt, scaler, per_positive_softmax_loss, to_input(images), targets, amp_dtype)
        return step
    return step_with


@command
def main(argv=None):
    p = parser("benchmarks.throughput", __doc__, windows=9)
    p.add_argument("--shards", type=Path, help="a shard folder made by preprocessing.build_shards")
    p.add_argument("--images", type=at_least_one, default=2000, help="images to generate when --shards is not given")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--batch-size", type=at_least_one, default=32)
    p.add_argument("--threads", type=at_least_one, default=None,
                   help="DALI threads = baseline workers (default: every core this process may use on the CPU; on a "
                        "GPU at most 8, as each thread holds its own pinned decoder buffers and nvJPEG decodes)")
    p.add_argument("--headline-windows", type=at_least_one, default=15,
                   help="windows of the headline pair (train loader, baseline), measured on their own")
    p.add_argument("--model", default="resnet18", help="timm model for the training-step figures")
    p.add_argument("--skip-training", action="store_true", help="loaders only, no training-step figures")
    p.add_argument("--config", default=str(REPO / "config.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--plot", type=output_file, metavar="PATH", help="a bar chart of the loaders (PNG)")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = min(usable_cores(), 8) if args.device == "gpu" else usable_cores()

    # loaders measured alone, with DALI's threads equal to the baseline's workers: no thread budget
    # (common.threads) splitting the cores with a model that is not running
    os.environ.setdefault("IIC_THREAD_BUDGET", "off")
    load_config(args.config, args.overrides)  # a wrong key or file: one line now, not after building shards
    with tempfile.TemporaryDirectory(prefix="iic_bench_") as work:  # generated shards: gone when it ends
        measure(args, Path(work))


def measure(args, work: Path) -> None:
    shards_dir = args.shards or photo_shards(work, args.images, [o for o in args.overrides if o.startswith("data.")])
    # channels-last where it pays (GPU tensor cores); on a CPU the layout the CPU figures were measured with
    cfg = load_config(args.config, [f"paths.shards={shards_dir}", f"pipeline.num_threads={args.threads}",
                                    f"pipeline.device={args.device}", f"model.channels_last={args.device == 'gpu'}",
                                    *args.overrides])
    device = resolve_device(args.device, announce=True)
    # the batches training gets: on a GPU float16 for autocast (model.amp), as training.train asks for them
    amp_dtype = autocast_dtype(device.kind == "gpu", cfg.model.amp, cfg.model.amp_dtype)
    shards = split_shards(shards_dir, "train")
    pipes = replace(PipeSettings.from_config(cfg, device=device, amp_dtype=amp_dtype), threads=args.threads)
    pipes32 = replace(pipes, dtype="float32")  # for comparison: normalised in DALI
    bs, timed = args.batch_size, dict(window_s=args.window_s, windows=args.windows)
    print(f"{shards.samples} images in {len(shards.tars)} shards; batch {bs}, {args.threads} threads/workers")

    def ceiling():
        pipe = decode_only_pipeline(shards.tars, shards.indexes, on_gpu=device.kind == "gpu", batch_size=bs,
                                    num_threads=args.threads, device_id=device.device_id,
                                    prefetch_queue_depth=cfg.pipeline.prefetch_queue_depth)
        pipe.build()
        return pipeline_runs(pipe)

    # every loader in one round-robin of windows, each window on a new instance (benchmarks.harness): drift on a
    # shared machine hits them alike, and each ratio is the median of the rounds' paired ratios
    streams = {
        "decode_ceiling": (ceiling, None),
        "dali_train_pipeline": (lambda: pipeline_runs(build_train_pipeline(pipes, shards, bs)), None),
        "dali_train": (lambda: endless(train_loader(pipes, shards, bs)), None),
        "dali_eval": (lambda: endless(eval_loader(pipes, shards, bs)), None),
        "dali_train_float32": (lambda: endless(train_loader(pipes32, shards, bs)), None),
    }
    if output_dtype(cfg.pipeline.dtype, device, amp_dtype) == "float32":
        del streams["dali_train_float32"]
    # the loaders' consumer only hands batches over: PyTorch on one thread, as the thread budget gives training on
    # a small CPU; its other intra-op threads would only spin against DALI's (the loader fell from 0.85 to 0.54
    # of the decode ceiling with two, docs/BENCHMARKS.md). The training steps below get every thread back.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = interleaved(streams, bs, **timed)
    loader_ratios = results.pop("ratios")
    gc.collect()
    # the headline pair on its own, with more windows: the baseline's windows are the noisiest figure (a tenth
    # from one window to the next), and with 9 windows one run in three strayed 14% from the others' median
    headline = interleaved({
        "dali_train": (lambda: endless(train_loader(pipes, shards, bs)), None),
        "baseline": (lambda: endless(baseline_loader(cfg, batch_size=bs, num_workers=args.threads, shards=shards)),
                     None)}, bs, window_s=args.window_s, windows=args.headline_windows)
    results["baseline"] = headline["baseline"]
    results["headline_dali_train"] = headline["dali_train"]
    gc.collect()
    torch.set_num_threads(threads)
    ratios = {"dali_train_vs_baseline": headline["ratios"]["dali_train"]["baseline"],
              "dali_train_vs_pipeline": loader_ratios["dali_train"]["dali_train_pipeline"],
              "dali_train_vs_decode_ceiling": loader_ratios["dali_train"]["decode_ceiling"],
              "dali_train_pipeline_vs_decode_ceiling": loader_ratios["dali_train_pipeline"]["decode_ceiling"]}
    if not args.skip_training:
        step_with = training_step_fn(args.model, shards.num_classes, device, cfg, amp_dtype)
        layout = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        streams = {
            "train_steps_dali": (lambda: endless(train_loader(pipes, shards, bs)),
                                 step_with(InputAdapter.from_config(cfg))),
            "train_steps_baseline": (lambda: endless(baseline_loader(cfg, batch_size=bs, num_workers=args.threads,
                                                                     shards=shards)),
                                     step_with(lambda x: x.to(memory_format=layout))),  # normalised float NCHW
        }
        steps = interleaved(streams, bs, **timed)
        gc.collect()
        for name in streams:
            results[name] = {**steps[name], "steps_per_s": round(steps[name]["images_per_s"] / bs, 3)}
        ratios["train_steps_dali_vs_baseline"] = steps["ratios"]["train_steps_dali"]["train_steps_baseline"]
    results["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    results["setup"] = {"device": args.device, "batch_size": bs, "threads": args.threads, "images": shards.samples,
                        "model": args.model, "dtype": output_dtype(cfg.pipeline.dtype, device, amp_dtype),
                        "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else None, "channels_last": cfg.model.channels_last,
                        "cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "window_s": args.window_s, "windows": args.windows,
                        "headline_windows": args.headline_windows,
                        "gpu": torch.cuda.get_device_name(0) if device.kind == "gpu" else None}

    print(f"\n{'measure':28s} {'images/s':>10s}  {'min':>9s} {'max':>9s}")
    for key in ("decode_ceiling", "dali_train_pipeline", "dali_train", "dali_train_float32", "headline_dali_train",
                "baseline", "dali_eval",
                "train_steps_dali", "train_steps_baseline"):
        if key in results:
            r = results[key]
            print(f"{key:28s} {r['images_per_s']:10.1f}  {r['min']:9.1f} {r['max']:9.1f}")
    for k, v in results["ratios"].items():
        print(f"{k:28s} {v:10.2f}")
    write_json(args.json, results)
    if args.plot:
        bar_plot(args.plot, {k: results[k]["images_per_s"] for k in ("decode_ceiling", "dali_train", "dali_eval",
                                                                     "baseline")},
                 "images / s", f"{args.device}, batch {bs}, {args.threads} threads")


if __name__ == "__main__":
    main()
