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
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from common.atomic import atomic_write_text
from common.cli import command, config_from_args, config_parser
from common.config import Config
from common.errors import UserError, writing
from common.log import progress
from common.seeds import int_seed
from common.shard_format import SplitShards, read_manifest, split_shards
from common.vocab import Vocabulary
from dali_pipes.device import PipeDevice, resolve_device
from dali_pipes.loader import eval_loader, prepare_input, train_loader
from model.checkpoint import (FOR_RESUME, load_checkpoint, load_weights, save_checkpoint, set_rng_state,
                              training_payload)
from model.decision import best_global_threshold, choose_rule
from model.metrics import global_average_precision
from model.network import autocast_dtype, create_model
from model.predict import predict_topk
from training import distributed
from training.losses import LOSSES
from training.tune_data import split_tune_shards, tune_parts

log = logging.getLogger(__name__)


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
    metric: str  # the validation figure that picks best.pt
    tta: str  # test-time views of validation

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def make_stage(cfg: Config, name: str, d: distributed.Dist) -> Stage:
    out = cfg.paths.artifacts / name
    if name == "train":
        return Stage(name, split_shards(cfg.paths.shards, "train"), split_shards(cfg.paths.shards, "val"),
                     cfg.train.epochs, cfg.train.lr, cfg.train.lr_step_epochs, out, "val_gap", "none")
    if d.is_main:
        split_tune_shards(cfg.paths.shards, out / "data", cfg.tune.holdout_fraction, cfg.data.seed)
    distributed.barrier(d)
    fit, holdout = tune_parts(cfg.paths.shards, out / "data")
    # the original tuned at a constant 1e-4 for 80 epochs; the rule is chosen on the submission's views
    return Stage(name, fit, holdout, cfg.tune.epochs, cfg.tune.lr, None, out, "val_f2_rule", cfg.predict.tta)


@dataclass
class TrainState:
    """What a training step changes, and where the run stands."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0  # finished epochs
    step: int = 0
    best_metric: float = -1.0


def create_train_state(cfg: Config, stage: Stage, num_classes: int, device: torch.device, amp_dtype) -> TrainState:
    torch.manual_seed(int_seed(cfg.data.seed, "model_init"))
    model = create_model(cfg.model.name, num_classes, cfg.model.channels_last, cfg.model.drop_rate).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=stage.lr, momentum=cfg.train.momentum,
                          nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)
    sched = (torch.optim.lr_scheduler.StepLR(opt, stage.step_epochs, cfg.train.lr_gamma) if stage.step_epochs
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return TrainState(model, opt, sched, scaler)


class CheckpointSaver:
    """Owns the checkpoint payload and the last/best paths (timm's CheckpointSaver, kept small)."""

    def __init__(self, stage: Stage, cfg: Config, classes: list[str], class_counts: list[int] | None):
        self.stage, self.cfg = stage, cfg
        self.classes, self.class_counts = classes, class_counts
        self.last, self.best = stage.checkpoints / "last.pt", stage.checkpoints / "best.pt"

    def save(self, state: TrainState, metric: float, decision_rule: dict | None) -> bool:
        """Write ``last.pt``, and ``best.pt`` when ``metric`` beats every earlier epoch; True then."""
        improved = metric > state.best_metric
        state.best_metric = max(state.best_metric, metric)
        payload = training_payload(
            model=state.model, optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
            stage=self.stage.name, epoch=state.epoch, step=state.step, metric=metric,
            best_metric=state.best_metric, model_name=self.cfg.model.name, classes=self.classes,
            class_counts=self.class_counts, decision_rule=decision_rule, config=self.cfg.to_dict())
        save_checkpoint(self.last, payload)
        if improved:
            save_checkpoint(self.best, payload)
        return improved


def initial_weights(cfg: Config, stage: Stage, init: str | None) -> Path | None:
    if init:
        return Path(init)
    if stage.name == "tune":
        path = cfg.paths.artifacts / "train" / "checkpoints" / "best.pt"
        if not path.is_file():
            raise UserError(f"the tune stage starts from {path}: run --stage train first or pass --init CKPT")
        return path
    return None


def resume_or_init(state: TrainState, saver: CheckpointSaver, cfg: Config, stage: Stage, init: str | None) -> None:
    """Resume exactly from ``last.pt`` if there is one; else start from ``--init`` (or, for tune, train's best)."""
    if saver.last.is_file():
        saved = load_checkpoint(saver.last, require=FOR_RESUME)
        load_weights(state.model, saved)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        state.epoch, state.step, state.best_metric = saved["epoch"], saved["step"], saved["best_metric"]
        log.info(f"resuming {stage.name} from {saver.last} after epoch {state.epoch}" if state.epoch < stage.epochs
                 else f"{stage.name} already finished its {stage.epochs} epochs ({saver.last}); nothing to do")
    elif (source := initial_weights(cfg, stage, init)) is not None:
        saved = load_checkpoint(source)
        if saved["classes"] != saver.classes:
            raise UserError(f"{source} was trained on another class list than {cfg.paths.shards}")
        load_weights(state.model, saved)
        log.info("%s: starting from %s", stage.name, source)


class MetricsLog:
    """metrics.jsonl and TensorBoard, on rank 0 only. Records after ``resumed_step`` (written by a run that
    stopped before its next checkpoint) are dropped, so a resumed run's file reads like an uninterrupted one's."""

    def __init__(self, out: Path, enabled: bool, resumed_step: int):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            out.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines(keepends=True)
                        if line.strip() and json.loads(line)["step"] <= resumed_step]
                atomic_write_text(self.path, "".join(kept))
            self.tb = SummaryWriter(str(out / "tb"), purge_step=resumed_step + 1)

    def write(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def train_one_epoch(net, state: TrainState, stage: Stage, cfg: Config, device: PipeDevice, d: distributed.Dist,
                    amp_dtype, metrics: MetricsLog, saver: CheckpointSaver) -> dict:
    """One pass over the stage's fit data; returns the epoch's loss, images seen, seconds and data wait."""
    loader = train_loader(cfg, rank=d.rank, world_size=d.world_size, batch_size=cfg.train.batch_size,
                          device=device, shards=stage.fit, epoch=state.epoch)
    steps = len(loader) if not cfg.train.max_steps_per_epoch else min(len(loader), cfg.train.max_steps_per_epoch)
    loss_fn = LOSSES[cfg.train.loss]
    losses, seen, wait, started = [], 0, 0.0, time.perf_counter()
    with progress(log, total=steps, desc=f"{stage.name} epoch {state.epoch + 1}/{stage.epochs}", unit="step") as bar:
        batches = iter(loader)
        for step in range(steps):
            t_wait = time.perf_counter()
            images, targets = next(batches)
            wait += time.perf_counter() - t_wait
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(prepare_input(images, cfg))
            loss = loss_fn(logits, targets)
            if distributed.any_rank(d, not torch.isfinite(loss).item(), device.torch_device):
                raise TrainingDiverged(
                    f"{stage.name}: the loss is {loss.item()} at epoch {state.epoch + 1}, step {step + 1}; stopped. "
                    f"The last good checkpoint is {saver.last if saver.last.exists() else 'none yet'}; "
                    f"lower the learning rate ({'train.lr' if stage.name == 'train' else 'tune.lr'})")
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            state.scaler.step(state.optimizer)
            state.scaler.update()
            losses.append(loss.item())
            seen += len(images)
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
            if state.step % cfg.train.log_every == 0:
                metrics.write({"stage": stage.name, "epoch": state.epoch + 1, "step": state.step,
                               "loss": float(np.mean(losses[-cfg.train.log_every:])),
                               "lr": state.optimizer.param_groups[0]["lr"]}, state.step)
    del batches, loader
    gc.collect()  # the DALI pipeline (and its buffers) goes before validation builds its own
    return {"loss": float(np.mean(losses)), "seen": seen, "seconds": time.perf_counter() - started, "wait": wait}


def validate(model, stage: Stage, cfg: Config, device: PipeDevice, d: distributed.Dist, amp_dtype) -> dict:
    """The stage's metrics over the whole validation split, gathered from every rank."""
    loader = eval_loader(cfg, rank=d.rank, world_size=d.world_size, batch_size=cfg.predict.batch_size,
                         device=device, shards=stage.val, tta=stage.tta)
    indices, scores, targets = [], [], []
    for idx, sc, (target, _) in predict_topk(model, loader, cfg.predict.top_k, lambda x: prepare_input(x, cfg),
                                             amp_dtype):
        indices.append(idx)
        scores.append(sc)
        targets += [np.flatnonzero(t).tolist() for t in target.cpu().numpy()]
    del loader
    parts = distributed.gather_objects(d, (np.concatenate(indices), np.concatenate(scores), targets))
    indices = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    targets = [t for p in parts for t in p[2]]
    result = {"val_images": len(targets), "val_gap": global_average_precision(indices, scores, targets)}
    threshold, f2 = best_global_threshold(indices, scores, targets, 1, cfg.predict.max_labels)
    result.update(val_f2=f2, val_threshold=threshold)
    if stage.name == "tune":
        rule, rule_f2 = choose_rule(indices, scores, targets, cfg.tune.min_class_examples)
        result.update(val_f2_rule=rule_f2, decision_rule=rule.to_dict())
    return result


def param_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights, to check that every rank holds the same model."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def log_epoch(record: dict, val: dict, stage: Stage, improved: bool) -> None:
    extra = f", rule F2 {val['val_f2_rule']:.4f}" if stage.name == "tune" else ""
    log.info(f"{stage.name} epoch {record['epoch']}: loss {record['loss']:.4f}, val GAP {val['val_gap']:.4f}, "
             f"F2 {val['val_f2']:.4f} at {val['val_threshold']:.2f}{extra}, "
             f"{record['images_per_s']:.0f} images/s, waiting for data {100 * record['data_wait_share']:.0f}%"
             f"{' (best)' if improved else ''}")


def train(cfg: Config, stage_name: str, init: str | None = None) -> dict:
    """Run (or resume) one stage to its last epoch; returns the last epoch's record."""
    device = resolve_device(cfg.pipeline.device, announce=True)
    d = distributed.setup(device.kind == "gpu")
    try:
        return _run(cfg, stage_name, init, device, d)
    finally:
        distributed.teardown(d)


def _run(cfg: Config, stage_name: str, init: str | None, device: PipeDevice, d: distributed.Dist) -> dict:
    stage = make_stage(cfg, stage_name, d)
    vocab = Vocabulary.load(cfg.paths.shards)
    counts = read_manifest(cfg.paths.shards).get("class_counts", {}).get("train")  # inference's fallback labels
    amp_dtype = autocast_dtype(device.kind == "gpu", cfg.model.amp)
    state = create_train_state(cfg, stage, len(vocab), device.torch_device, amp_dtype)
    saver = CheckpointSaver(stage, cfg, vocab.codes, counts)
    resume_or_init(state, saver, cfg, stage, init)
    net = torch.compile(state.model) if cfg.model.compile else state.model
    if d.active:
        net = DistributedDataParallel(net, device_ids=[d.local_rank] if device.kind == "gpu" else None)
    metrics = MetricsLog(stage.out, d.is_main, state.step)
    record: dict = {}
    try:
        while state.epoch < stage.epochs:
            epoch = train_one_epoch(net, state, stage, cfg, device, d, amp_dtype, metrics, saver)
            lr = state.optimizer.param_groups[0]["lr"]
            state.scheduler.step()
            state.epoch += 1
            val = validate(state.model, stage, cfg, device, d, amp_dtype)
            checks = distributed.gather_objects(d, (param_checksum(state.model), epoch["seen"]))
            record = {"stage": stage.name, "epoch": state.epoch, "step": state.step, "loss": epoch["loss"], "lr": lr,
                      "images_per_s": sum(c[1] for c in checks) / epoch["seconds"],
                      "data_wait_share": epoch["wait"] / epoch["seconds"],
                      **{k: v for k, v in val.items() if k != "decision_rule"},
                      "rank_param_checksums": [c[0] for c in checks], "samples_per_rank": [c[1] for c in checks]}
            if d.is_main:
                improved = saver.save(state, val[stage.metric], val.get("decision_rule"))
                metrics.write(record, state.step)
                log_epoch(record, val, stage, improved)
            distributed.barrier(d)
    finally:
        metrics.close()
    return record


@command(batch_keys="train.batch_size (per process), or predict.batch_size for validation")
def main(argv=None):
    parser = config_parser("python -m training.train", __doc__)
    parser.add_argument("--stage", choices=["train", "tune"], required=True)
    parser.add_argument("--init", metavar="CKPT", help="start from these weights (tune default: train's best.pt)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    train(cfg, args.stage, args.init)


if __name__ == "__main__":
    main()
