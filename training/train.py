"""Train SE-ResNet101 on the train shards, or fine-tune it on the stage-1 tuning labels.

    python -m training.train --config config.yaml --stage train|tune [--set k=v ...] [--init CKPT]
    scripts/train.sh --nproc-per-node 8 -- --config config.yaml --stage train     # all GPUs (torchrun)

Writes ``paths.artifacts/<stage>/``: ``checkpoints/last.pt`` every epoch, ``checkpoints/best.pt``
by the validation metric (train: GAP over the top-k rescored scores on ``val``; tune: mean F2
of the decision rule chosen on the held-out tuning images, saved in the checkpoint), ``tb/``
(TensorBoard) and ``metrics.jsonl``. Run again, it resumes from ``last.pt``. The tune stage
starts from the train stage's ``best.pt`` unless ``--init`` names another checkpoint.
"""
from __future__ import annotations

import gc
import os
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.cli import command, config_from_args, config_parser
from common.config import Config
from common.errors import UserError
from common.shard_format import SplitShards, read_manifest, split_shards
from common.vocab import Vocabulary
from dali_pipes.device import PipeDevice, resolve_device
from dali_pipes.loader import eval_loader, prepare_input, train_loader, view_averaged_logits
from training import distributed
from training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.decision import best_global_threshold, choose_rule
from training.losses import LOSSES
from training.metrics import global_average_precision, topk_rescore
from training.model import autocast_for, create_model
from training.tune_data import split_tune_shards, tune_parts


class TrainingDiverged(UserError):
    pass


@dataclass
class Stage:
    name: str
    fit: SplitShards
    val: SplitShards
    epochs: int
    lr: float
    step_epochs: int | None  # None: constant learning rate
    out: Path

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def make_stage(cfg: Config, name: str, d: distributed.Dist) -> Stage:
    out = cfg.paths.artifacts / name
    if name == "train":
        return Stage(name, split_shards(cfg.paths.shards, "train"), split_shards(cfg.paths.shards, "val"),
                     cfg.train.epochs, cfg.train.lr, cfg.train.lr_step_epochs, out)
    if d.is_main:
        split_tune_shards(cfg.paths.shards, out / "data", cfg.tune.holdout_fraction, cfg.data.seed)
    distributed.barrier(d)
    fit, holdout = tune_parts(cfg.paths.shards, out / "data")
    # the original tuned at a constant 1e-4 for 80 epochs
    return Stage(name, fit, holdout, cfg.tune.epochs, cfg.tune.lr, None, out)


def param_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights, to check that every rank holds the same model."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


@torch.no_grad()
def predict_topk(model, loader, cfg: Config, k: int, amp_dtype) -> tuple[np.ndarray, np.ndarray, list, list]:
    """(indices, scores, targets, image ids) of this rank's part of a split, top-k rescored."""
    model.eval()
    indices, scores, targets, ids = [], [], [], []
    for images, target, image_ids in loader:
        idx, sc = topk_rescore(view_averaged_logits(model, images, cfg, amp_dtype), k)
        indices.append(idx.cpu().numpy())
        scores.append(sc.cpu().numpy())
        targets += [np.flatnonzero(t).tolist() for t in target.cpu().numpy()]
        ids += image_ids
    model.train()
    return np.concatenate(indices), np.concatenate(scores), targets, ids


def validate(model, stage: Stage, cfg: Config, device: PipeDevice, d: distributed.Dist, amp_dtype) -> dict:
    """The stage's metrics over the whole validation split, gathered from every rank."""
    # the tune stage chooses the decision rule on the same test-time views the submission will use
    tta = cfg.submit.tta if stage.name == "tune" else "none"
    loader = eval_loader(cfg, rank=d.rank, world_size=d.world_size, batch_size=cfg.submit.batch_size,
                         device=device, shards=stage.val, tta=tta)
    k = cfg.validation.top_k if stage.name == "train" else cfg.submit.top_k
    parts = distributed.gather_objects(d, predict_topk(model, loader, cfg, k, amp_dtype))
    del loader
    indices = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    targets = [t for p in parts for t in p[2]]
    result = {"val_images": len(targets), "val_gap": global_average_precision(indices, scores, targets)}
    threshold, f2 = best_global_threshold(indices, scores, targets, 1, cfg.submit.max_labels)
    result.update(val_f2=f2, val_threshold=threshold)
    if stage.name == "tune":
        rule, rule_f2 = choose_rule(indices, scores, targets, cfg.tune.min_class_examples)
        result.update(val_f2_rule=rule_f2, decision_rule=rule.to_dict())
    return result


class Logger:
    """metrics.jsonl, TensorBoard and the console, on rank 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            out.mkdir(parents=True, exist_ok=True)
            self.tb = SummaryWriter(str(out / "tb"))

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def initial_weights(cfg: Config, stage: Stage, init: str | None) -> Path | None:
    if init:
        return Path(init)
    if stage.name == "tune":
        path = cfg.paths.artifacts / "train" / "checkpoints" / "best.pt"
        if not path.is_file():
            raise UserError(f"the tune stage starts from {path}: run --stage train first or pass --init CKPT")
        return path
    return None


def train(cfg: Config, stage_name: str, init: str | None = None, quiet: bool = False) -> dict:
    """Run (or resume) one stage to its last epoch; returns the last epoch's record."""
    device = resolve_device(cfg.pipeline.device, announce=not quiet and os.environ.get("RANK", "0") == "0")
    d = distributed.setup(device.kind == "gpu")
    try:
        return _train(cfg, stage_name, init, quiet, device, d)
    finally:
        distributed.teardown(d)


def _train(cfg, stage_name, init, quiet, device, d) -> dict:
    torch.manual_seed(cfg.data.seed)
    stage = make_stage(cfg, stage_name, d)
    vocab = Vocabulary.load(cfg.paths.shards)
    counts = read_manifest(cfg.paths.shards).get("class_counts", {}).get("train")  # inference's fallback labels
    tdev = device.torch_device
    model = create_model(cfg.model.name, len(vocab), cfg.model.channels_last, cfg.model.drop_rate).to(tdev)
    opt = torch.optim.SGD(model.parameters(), lr=stage.lr, momentum=cfg.train.momentum,
                          nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)
    sched = (torch.optim.lr_scheduler.StepLR(opt, stage.step_epochs, cfg.train.lr_gamma) if stage.step_epochs
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    amp_dtype = autocast_for(device, cfg.train.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loss_fn = LOSSES[cfg.train.loss]
    last, best_path = stage.checkpoints / "last.pt", stage.checkpoints / "best.pt"
    start_epoch, best_metric, global_step = 0, -1.0, 0

    if last.is_file():  # resume exactly where the last finished epoch left off
        state = load_checkpoint(last)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, best_metric, global_step = state["epoch"], state["best_metric"], state["step"]
        if d.is_main and not quiet:
            print(f"resuming {stage.name} from {last} after epoch {start_epoch}" if start_epoch < stage.epochs else
                  f"{stage.name} already finished its {stage.epochs} epochs ({last}); nothing to do")
    elif (source := initial_weights(cfg, stage, init)) is not None:
        state = load_checkpoint(source)
        if state.get("classes") != vocab.codes:
            raise UserError(f"{source} was trained on another class list than {cfg.paths.shards}")
        model.load_state_dict(state["model"])
        if d.is_main and not quiet:
            print(f"{stage.name}: starting from {source}")

    if cfg.model.compile:
        model = torch.compile(model)
    net = DistributedDataParallel(model, device_ids=[d.local_rank] if device.kind == "gpu" else None) \
        if d.active else model
    logger = Logger(stage.out, d.is_main)
    record: dict = {}
    try:
        for epoch in range(start_epoch, stage.epochs):
            loader = train_loader(cfg, rank=d.rank, world_size=d.world_size, device=device, shards=stage.fit,
                                  epoch=epoch)
            steps = len(loader) if not cfg.train.max_steps_per_epoch else min(len(loader), cfg.train.max_steps_per_epoch)
            losses, seen, wait, t0 = [], 0, 0.0, time.perf_counter()
            bar = tqdm(total=steps, desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}", unit="step",
                       disable=quiet or not d.is_main, dynamic_ncols=True)
            batches = iter(loader)
            for step in range(steps):
                t_wait = time.perf_counter()
                images, targets = next(batches)
                wait += time.perf_counter() - t_wait
                with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = net(prepare_input(images, cfg))
                loss = loss_fn(logits, targets)
                if distributed.any_rank(d, not torch.isfinite(loss).item(), tdev):
                    raise TrainingDiverged(
                        f"{stage.name}: the loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopped. "
                        f"The last good checkpoint is {last if last.exists() else 'none yet'}; "
                        f"lower the learning rate ({stage.name == 'train' and 'train.lr' or 'tune.lr'})")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                losses.append(loss.item())
                seen += len(images)
                global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
                if global_step % cfg.train.log_every == 0:
                    logger.log({"stage": stage.name, "epoch": epoch + 1, "step": global_step,
                                "loss": float(np.mean(losses[-cfg.train.log_every:])),
                                "lr": opt.param_groups[0]["lr"]}, global_step)
            bar.close()
            del batches, loader
            gc.collect()
            seconds = time.perf_counter() - t0
            lr = opt.param_groups[0]["lr"]
            sched.step()
            val = validate(model, stage, cfg, device, d, amp_dtype)
            metric = val["val_f2_rule"] if stage.name == "tune" else val["val_gap"]
            checks = distributed.gather_objects(d, (param_checksum(model), seen))
            record = {"stage": stage.name, "epoch": epoch + 1, "step": global_step,
                      "loss": float(np.mean(losses)), "lr": lr,
                      "images_per_s": sum(c[1] for c in checks) / seconds, "data_wait_share": wait / seconds,
                      **{k: v for k, v in val.items() if k != "decision_rule"},
                      "rank_param_checksums": [c[0] for c in checks], "samples_per_rank": [c[1] for c in checks]}
            improved = metric > best_metric
            best_metric = max(best_metric, metric)
            if d.is_main:
                payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                           "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": global_step,
                           "best_metric": best_metric, "metric": metric, "rng": rng_state(), "stage": stage.name,
                           "model_name": cfg.model.name, "classes": vocab.codes, "config": cfg.to_dict(),
                           "class_counts": counts,
                           "decision_rule": val.get("decision_rule")}
                save_checkpoint(last, payload)
                if improved:
                    save_checkpoint(best_path, payload)
                logger.log(record, global_step)
                if not quiet:
                    extra = f", rule F2 {val['val_f2_rule']:.4f}" if stage.name == "tune" else ""
                    print(f"{stage.name} epoch {epoch + 1}: loss {record['loss']:.4f}, val GAP {val['val_gap']:.4f}, "
                          f"F2 {val['val_f2']:.4f} at {val['val_threshold']:.2f}{extra}, "
                          f"{record['images_per_s']:.0f} images/s, waiting for data {100 * record['data_wait_share']:.0f}%"
                          f"{' (best)' if improved else ''}")
            distributed.barrier(d)
    finally:
        logger.close()
    return record


@command
def main(argv=None):
    parser = config_parser("python -m training.train", __doc__)
    parser.add_argument("--stage", choices=["train", "tune"], required=True)
    parser.add_argument("--init", metavar="CKPT", help="start from these weights (tune default: train's best.pt)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    train(cfg, args.stage, args.init)


if __name__ == "__main__":
    main()
