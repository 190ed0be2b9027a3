#!/usr/bin/env python3
"""Every GPU path of the project in one command, with a JSON report (at most about 8 minutes on one GPU).

    python scripts/gpu_check.py --json gpu_check.json [--images 2000] [--batch-size 128] [--model seresnet101]

1. parity: the GPU graphs against the CPU graphs on the same shards: eval pixels (through
   ``prepare_input``, normalised NCHW), labels and ids exactly, ten-crop views in the same order;
2. throughput on the GPU: the decode-only ceiling, the train loader and the eval loader, images/s;
3. training: SE-ResNet101 (bf16 autocast, channels-last) steps/s fed by the DALI train loader against
   the same steps on one synthetic batch kept on the GPU, so the share of time waiting for data is
   measured, not guessed;
4. the commands: a short train run (mid-epoch checkpoint and validation on the GPU), then
   ``inference.submit`` for stage 2, on demo-sized data.
It makes its own data (as the throughput benchmark does) and needs nothing but the installed
project. Each part that fails is recorded in the report and makes the exit code 1; on a machine
without a GPU it stops at once.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def timed_rate(batches, batch_size: int, n: int, repeats: int = 3, warmup: int = 3, step=None) -> dict:
    """Median images/s over ``repeats`` runs of ``n`` batches; the GPU is synchronised at each run's end only."""
    for _ in range(warmup):
        batch = next(batches)
        if step:
            step(batch)
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            batch = next(batches)
            if step:
                step(batch)
        torch.cuda.synchronize()
        runs.append(n * batch_size / (time.perf_counter() - start))
    return {"images_per_s": round(statistics.median(runs), 1), "runs": [round(r, 1) for r in runs]}


def parity(cfg, shards) -> dict:
    from dali_pipes.device import resolve_device
    from dali_pipes.loader import eval_loader, prepare_input
    gpu, cpu = resolve_device("gpu"), resolve_device("cpu")
    out = {}
    for tta in ("none", "tencrop"):
        diffs, ids_equal, labels_equal = [], True, True
        gpu_batches = eval_loader(cfg, "val", batch_size=16, device=gpu, tta=tta, shards=shards,
                                  amp_dtype=torch.bfloat16)
        cpu_batches = eval_loader(cfg, "val", batch_size=16, device=cpu, tta=tta, shards=shards)
        for (g, gt, gid), (c, ct, cid) in zip(gpu_batches, cpu_batches):
            g, c = prepare_input(g, cfg).float().cpu(), prepare_input(c, cfg)
            diffs.append((g - c).abs())
            ids_equal &= gid == cid
            labels_equal &= torch.equal(gt.cpu(), ct)
            if tta == "tencrop":  # view 4 the centre, views 5..9 the mirrors of 0..4, on the GPU too
                out["tencrop_mirrors_in_order"] = bool(torch.allclose(g[:, 5:], g[:, :5].flip(-1), atol=1e-2))
        diff = torch.cat([d.flatten() for d in diffs])
        out[tta] = {"mean_abs_diff": round(diff.mean().item(), 5), "max_abs_diff": round(diff.max().item(), 4),
                    "ids_equal": ids_equal, "labels_equal": labels_equal}
    # nvJPEG and libjpeg-turbo may round differently: the CPU tests' tolerance for two decoders is 0.03 mean
    out["ok"] = all(out[t]["mean_abs_diff"] < 0.03 and out[t]["ids_equal"] and out[t]["labels_equal"]
                    for t in ("none", "tencrop")) and out.get("tencrop_mirrors_in_order", False)
    return out


def throughput(cfg, shards, batch_size: int) -> dict:
    from dali_pipes.device import resolve_device
    from dali_pipes.loader import eval_loader, pipeline_threads, train_loader
    from dali_pipes.pipelines import decode_only_pipeline
    gpu = resolve_device("gpu")
    ceiling = decode_only_pipeline(shards.tars, shards.indexes, on_gpu=True, batch_size=batch_size,
                                   num_threads=pipeline_threads(cfg.pipeline.num_threads), device_id=gpu.device_id,
                                   prefetch_queue_depth=cfg.pipeline.prefetch_queue_depth)
    ceiling.build()

    def runs(pipe):
        while True:
            pipe.run()
            yield None
    n = max(5, shards.samples // batch_size // 2)
    result = {"decode_ceiling": timed_rate(runs(ceiling), batch_size, n)}
    del ceiling
    result["dali_train"] = timed_rate(train_loader(cfg, batch_size=batch_size, device=gpu, shards=shards,
                                                   amp_dtype=torch.bfloat16).stream(), batch_size, n)
    result["dali_eval"] = timed_rate(eval_loader(cfg, "train", batch_size=batch_size, device=gpu, shards=shards,
                                                 amp_dtype=torch.bfloat16).stream(), batch_size, n)
    return result


def training_steps(cfg, shards, batch_size: int, model_name: str, steps: int) -> dict:
    from dali_pipes.device import resolve_device
    from dali_pipes.loader import prepare_input, train_loader
    from model.network import create_model
    from training.losses import per_positive_softmax_loss
    gpu = resolve_device("gpu")
    torch.backends.cudnn.benchmark = True
    model = create_model(model_name, shards.num_classes, channels_last=True).to(gpu.torch_device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step(batch):
        images, targets = batch
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(prepare_input(images, cfg))
        loss = per_positive_softmax_loss(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    loader = train_loader(cfg, batch_size=batch_size, device=gpu, shards=shards, amp_dtype=torch.bfloat16)
    fed = timed_rate(loader.stream(), batch_size, steps, step=step)
    one = next(loader.stream())
    one = (one[0].clone(), one[1].clone())

    def same_batch():
        while True:
            yield one
    synthetic = timed_rate(same_batch(), batch_size, steps, step=step)
    return {"model": model_name, "batch_size": batch_size, "autocast": "bfloat16", "channels_last": True,
            "dali_fed": {**fed, "steps_per_s": round(fed["images_per_s"] / batch_size, 2)},
            "synthetic_batch": {**synthetic, "steps_per_s": round(synthetic["images_per_s"] / batch_size, 2)},
            "data_wait_share": round(max(0.0, 1 - fed["images_per_s"] / synthetic["images_per_s"]), 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}


def run_commands(work: Path) -> dict:
    """The README's commands on a small demo dataset, on the GPU: train (with mid-epoch checkpoints), submit."""
    from common.config import load_config
    from demo.data import generate_demo_data
    from inference.submit import submit
    from model.checkpoint import load_checkpoint
    from preprocessing.build_shards import build_shards
    from training.train import train
    layout = generate_demo_data(work / "demo", n_train=1200, n_stage1=100, n_stage2=300, n_tune=50)
    overrides = [f"paths.original_images={layout.original_images}", f"paths.competition_data={layout.competition_data}",
                 f"paths.shards={work / 'demo_shards'}", f"paths.artifacts={work / 'artifacts'}",
                 f"paths.output={work / 'output'}", "pipeline.device=gpu", "train.epochs=2", "train.batch_size=64",
                 "train.checkpoint_every_steps=5", "model.channels_last=true"]
    cfg = load_config(REPO / "demo" / "config.yaml", overrides)
    build_shards(cfg)
    started = time.perf_counter()
    record = train(cfg, "train")
    trained = time.perf_counter() - started
    saved = load_checkpoint(work / "artifacts" / "train" / "checkpoints" / "last.pt")
    started = time.perf_counter()
    summary = submit(cfg, 2, work / "artifacts" / "train" / "checkpoints" / "best.pt")
    return {"train_seconds": round(trained, 1), "train_images_per_s": round(record["images_per_s"], 1),
            "data_wait_share": round(record["data_wait_share"], 3), "val_gap": round(record["val_gap"], 4),
            "epochs_saved": saved["epoch"], "submit_seconds": round(time.perf_counter() - started, 1),
            "predicted": summary["predicted"], "fallback": summary["fallback"],
            "ok": saved["epoch"] == 2 and summary["fallback"] == 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the report")
    parser.add_argument("--images", type=int, default=2000, help="photographs to generate for the shards")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="seresnet101")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU that PyTorch can use, and this machine has none "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
        return 2

    from benchmark_throughput import make_shards
    from common.config import load_config
    from common.log import setup_logging
    from common.shard_format import split_shards
    setup_logging()
    report = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cuda": torch.version.cuda}
    work = Path(tempfile.mkdtemp(prefix="iic_gpu_check_"))
    shards_dir = make_shards(work, args.images)
    cfg = load_config(REPO / "config.yaml", [f"paths.shards={shards_dir}", "model.channels_last=true"])
    train_shards = split_shards(shards_dir, "train")
    parts = {"parity": lambda: parity(cfg, split_shards(shards_dir, "val")),
             "throughput": lambda: throughput(cfg, train_shards, args.batch_size),
             "training": lambda: training_steps(cfg, train_shards, args.batch_size, args.model, args.steps),
             "commands": lambda: run_commands(work)}
    failed = False
    for name, part in parts.items():
        started = time.perf_counter()
        try:
            report[name] = part()
        except Exception as exc:  # one broken part must not hide the others' figures
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
        failed |= "error" in report[name] or report[name].get("ok") is False
        args.json.write_text(json.dumps(report, indent=1) + "\n")  # after each part: a timeout keeps what was done
        print(f"{name}: {json.dumps(report[name])[:600]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
