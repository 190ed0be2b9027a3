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

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from common.atomic import atomic_write_text
from common.cli import command, config_from_args, config_parser
from common.config import Config
from common.errors import UserError, writing
from common.paths import readable_dir, readable_file, writable_dir
from common.log import progress as progress_bar
from common.seeds import int_seed, training_seed
from common.threads import apply_thread_budget
from common.shard_format import SplitShards, read_manifest, split_shards
from common.vocab import Vocabulary
from dali_pipes.device import PipeDevice, resolve_device
from dali_pipes.loader import ImageFileLoader, check_data_settings, eval_loader, prepare_input, train_loader
from model.checkpoint import (FOR_RESUME, load_checkpoint, load_weights, model_from_checkpoint, rank_rng_state,
                              restore_scaler, rng_state, save_checkpoint, set_rng_state, training_payload)
from model.decision import DecisionRule, best_global_threshold, choose_rule, choose_test_resolution
from model.metrics import global_average_precision
from model.network import autocast_dtype, create_model
from model.predict import predict_topk
from training import distributed
from training.losses import LOSSES
from common.tune_split import (holdout_fingerprint, holdout_ids, holdout_originals, split_tune_shards, tune_parts,
                               tuning_classes)

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
    seen_classes: list[int] | None = None  # tune: the classes of the tuning labels, for the unseen-class threshold
    machine_labels: bool = False  # fit on the shards' machine labels too (soft targets)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def make_stage(cfg: Config, name: str, d: distributed.Dist) -> Stage:
    out = cfg.paths.artifacts / name
    if name == "train":
        return Stage(name, split_shards(cfg.paths.shards, "train"), split_shards(cfg.paths.shards, "val"),
                     cfg.train.epochs, cfg.train.lr, cfg.train.lr_step_epochs, out, "val_gap", "none",
                     machine_labels=cfg.data.machine_labels)
    if d.is_main:
        split_tune_shards(cfg.paths.shards, out / "data", cfg.tune.holdout_fraction, cfg.data.seed)
    distributed.barrier(d)
    fit, holdout = tune_parts(cfg.paths.shards, out / "data")
    # the original tuned at a constant 1e-4 for 80 epochs; the rule is chosen on the submission's views
    seen = tuning_classes(cfg.paths.shards) if cfg.tune.unseen_class_threshold else None
    return Stage(name, fit, holdout, cfg.tune.epochs, cfg.tune.lr, None, out, "val_f2_rule", cfg.predict.tta, seen)


@dataclass
class EpochProgress:
    """How far into the current epoch a run stands, with the epoch's running sums (saved mid-epoch)."""
    step: int = 0  # steps done in this epoch
    loss_sum: float = 0.0
    seen: int = 0  # images this rank trained on
    seconds: float = 0.0
    wait: float = 0.0  # of which waiting for data
    log_sum: float = 0.0  # loss sum and steps since the last metrics record
    log_steps: int = 0
    lr: float = 0.0  # the learning rate of the latest step


@dataclass
class TrainState:
    """What a training step changes, and where the run stands."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0  # finished epochs
    step: int = 0  # steps of the stage so far
    best_metric: float = -1.0
    progress: EpochProgress = field(default_factory=EpochProgress)


def lr_factor(cfg: Config, stage: Stage, steps_per_epoch: int, world_size: int):
    """The learning rate's factor at each step: linear scaling with the global batch over the original 32
    (``train.lr_scaling``) with its warm-up, and the step decay every ``lr_step_epochs`` epochs."""
    scale = cfg.train.batch_size * world_size / 32 if cfg.train.lr_scaling == "linear" else 1.0
    warmup = cfg.train.warmup_epochs * steps_per_epoch if cfg.train.lr_scaling == "linear" else 0

    def factor(step: int) -> float:
        decay = cfg.train.lr_gamma ** ((step // steps_per_epoch) // stage.step_epochs) if stage.step_epochs else 1.0
        return scale * decay * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return factor


def create_train_state(cfg: Config, stage: Stage, num_classes: int, device: torch.device, amp_dtype,
                       steps_per_epoch: int, world_size: int) -> TrainState:
    torch.manual_seed(int_seed(training_seed(cfg), "model_init"))  # dropout draws from it too
    model = create_model(cfg.model.name, num_classes, cfg.model.channels_last, cfg.model.drop_rate).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=stage.lr, momentum=cfg.train.momentum,
                          nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, stage, steps_per_epoch, world_size))  # per step
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return TrainState(model, opt, sched, scaler)


class CheckpointSaver:
    """Owns the checkpoint payload and the last/best paths (timm's CheckpointSaver, kept small)."""

    def __init__(self, stage: Stage, cfg: Config, classes: list[str], class_counts: list[int] | None,
                 d: distributed.Dist):
        self.stage, self.cfg, self.d = stage, cfg, d
        self.classes, self.class_counts = classes, class_counts
        self.last, self.best = stage.checkpoints / "last.pt", stage.checkpoints / "best.pt"
        # the images the tune stage's rule is chosen on (an ensemble of tuned members must choose on the same)
        self.holdout = holdout_fingerprint(holdout_ids(stage.out / "data")) if stage.name == "tune" else None

    def save(self, state: TrainState, loader, metric: float | None = None, decision_rule: dict | None = None) -> bool:
        """Write ``last.pt`` (every rank takes part: each hands over its DALI state), and at an epoch's end
        ``best.pt`` too when ``metric`` beats every earlier epoch; True then."""
        # every rank's DALI state and random state: each resumes its own data and its own draws
        dali, rngs = zip(*distributed.gather_objects(self.d, (loader.checkpoint(), rng_state())))
        improved = metric is not None and metric > state.best_metric
        if metric is not None:
            state.best_metric = max(state.best_metric, metric)
        if not self.d.is_main:
            return improved
        payload = training_payload(
            model=state.model, optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
            stage=self.stage.name, epoch=state.epoch, step=state.step, metric=metric,
            best_metric=state.best_metric, model_name=self.cfg.model.name, classes=self.classes,
            class_counts=self.class_counts, decision_rule=decision_rule, config=self.cfg.to_dict(),
            epoch_progress=asdict(state.progress), dali=list(dali), rng_per_rank=list(rngs),
            world_size=self.d.world_size, holdout=self.holdout)
        save_checkpoint(self.last, payload)
        if improved:
            save_checkpoint(self.best, payload)
        return improved


def initial_weights(cfg: Config, stage: Stage, init: str | None) -> Path | None:
    if init:
        return readable_file(Path(init), "--init")
    if stage.name == "tune":
        path = cfg.paths.artifacts / "train" / "checkpoints" / "best.pt"
        if not path.is_file():
            raise UserError(f"the tune stage starts from {path}: run --stage train first or pass --init CKPT")
        return path
    return None


def resume_or_init(state: TrainState, saver: CheckpointSaver, cfg: Config, stage: Stage, init: str | None,
                   d: distributed.Dist) -> str | None:
    """Resume exactly from ``last.pt`` if there is one (returning this rank's DALI checkpoint, if it can be
    used); else start from ``--init`` (or, for tune, train's best)."""
    if saver.last.is_file():
        saved = load_checkpoint(saver.last, require=FOR_RESUME)
        load_weights(state.model, saved)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        restore_scaler(state.scaler, saved["scaler"])
        set_rng_state(rank_rng_state(saved, d.rank, d.world_size))
        state.epoch, state.step, state.best_metric = saved["epoch"], saved["step"], saved["best_metric"]
        state.progress = EpochProgress(**saved.get("epoch_progress") or {})
        where = f"epoch {state.epoch + 1}, step {state.progress.step}" if state.progress.step else \
            f"the end of epoch {state.epoch}"
        log.info(f"resuming {stage.name} from {saver.last} at {where}" if state.epoch < stage.epochs
                 else f"{stage.name} already finished its {stage.epochs} epochs ({saver.last}); nothing to do")
        if saved.get("world_size") == d.world_size and saved.get("dali"):
            return saved["dali"][d.rank]
        if state.progress.step:
            log.warning("last.pt was saved by %s process(es), this run has %d: the data of epoch %d starts afresh",
                        saved.get("world_size"), d.world_size, state.epoch + 1)
            state.progress = EpochProgress()
    elif (source := initial_weights(cfg, stage, init)) is not None:
        saved = load_checkpoint(source)
        if saved["classes"] != saver.classes:
            raise UserError(f"{source} was trained on another class list than {cfg.paths.shards}")
        load_weights(state.model, saved)
        log.info("%s: starting from %s", stage.name, source)
    return None


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
        with writing(self.path.parent / "tb"):  # its writer thread's full disk surfaces here
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()


class LossWatch:
    """The loss summed on the device, read back only at a flush (every ``train.log_every`` steps, at a
    checkpoint and at an epoch's end): a read is a host sync, and one per step would keep the CPU from
    queueing the next step while the GPU works. The first non-finite loss is remembered on the device too,
    so a divergence is still named by its step. Under DDP a flush is one all-reduce, so every rank takes the
    same stop decision."""

    NONE = 1 << 62

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, step_in_epoch: int) -> None:
        loss = loss.detach().double()
        if self.count == 0:
            self.step.fill_(step_in_epoch)
        newly_bad = ~torch.isfinite(loss) & (self.bad_step == self.NONE)
        self.bad_step = torch.where(newly_bad, self.step, self.bad_step)
        self.bad_value = torch.where(newly_bad, loss, self.bad_value)
        self.sum += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        self.step += 1
        self.count += 1

    def flush(self, d: distributed.Dist) -> tuple[float, int, int | None, float]:
        """(loss sum, steps, first non-finite step (1-based within the epoch) or None, its loss); resets."""
        if self.count == 0:
            return 0.0, 0, None, 0.0
        packed = torch.stack([self.sum, self.bad_step.double(), self.bad_value])
        if d.active:
            sums = packed[:1].clone()
            distributed.all_reduce(d, sums)  # the mean loss over ranks
            first = packed[1:2].clone()
            distributed.all_reduce(d, first, op="min")
            packed = torch.cat([sums / d.world_size, first, packed[2:]])
        total, bad, value = packed.tolist()
        count = self.count
        self.sum.zero_()
        self.count = 0
        return total, count, (int(bad) + 1 if bad < self.NONE else None), value


def training_step(net, optimizer, scaler, loss_fn, inputs, targets, amp_dtype) -> torch.Tensor:
    """One optimiser step on one batch of model inputs (``prepare_input``'s), as training takes it: the
    benchmarks and the GPU check time this very function. Returns the loss, still on the device (reading it
    is a host sync)."""
    with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(inputs)
    loss = loss_fn(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def train_one_epoch(net, batches, loader, state: TrainState, stage: Stage, cfg: Config, device: PipeDevice,
                    d: distributed.Dist, amp_dtype, steps: int, metrics: MetricsLog, saver: CheckpointSaver) -> None:
    """The rest of the current epoch: from ``state.progress.step`` to ``steps``, with mid-epoch checkpoints."""
    loss_fn = LOSSES[cfg.train.loss](cfg.train)
    progress = state.progress
    watch = LossWatch(device.torch_device)

    def flush(log_now: bool) -> None:
        total, count, bad_step, bad_value = watch.flush(d)
        if bad_step is not None:
            raise TrainingDiverged(
                f"{stage.name}: the loss is {bad_value} at epoch {state.epoch + 1}, step {bad_step}; stopped. "
                f"The last good checkpoint is {saver.last if saver.last.exists() else 'none yet'}; "
                f"lower the learning rate ({'train.lr' if stage.name == 'train' else 'tune.lr'})")
        progress.loss_sum += total
        progress.log_sum += total
        progress.log_steps += count
        if log_now and progress.log_steps:
            loss = progress.log_sum / progress.log_steps
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            metrics.write({"stage": stage.name, "epoch": state.epoch + 1, "step": state.step, "loss": loss,
                           "lr": progress.lr}, state.step)
            progress.log_sum, progress.log_steps = 0.0, 0

    started = time.perf_counter() - progress.seconds
    with progress_bar(log, total=steps, initial=progress.step, unit="step",
                      desc=f"{stage.name} epoch {state.epoch + 1}/{stage.epochs}") as bar:
        while progress.step < steps:
            t_wait = time.perf_counter()
            images, targets = next(batches)
            progress.wait += time.perf_counter() - t_wait
            loss = training_step(net, state.optimizer, state.scaler, loss_fn, prepare_input(images, cfg), targets,
                                 amp_dtype)
            progress.lr = state.optimizer.param_groups[0]["lr"]
            state.scheduler.step()  # per step: the warm-up and the decay are functions of the step
            watch.add(loss, progress.step)
            progress.step += 1
            progress.seen += len(images)
            state.step += 1
            bar.update(1)
            at_log = state.step % cfg.train.log_every == 0
            at_checkpoint = cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0
            if at_log or at_checkpoint or progress.step == steps:
                flush(at_log)  # before any checkpoint: a diverged state is never saved
            if at_checkpoint and progress.step < steps:  # (the epoch's end saves after validation)
                progress.seconds = time.perf_counter() - started
                saver.save(state, loader)
    progress.seconds = time.perf_counter() - started


def validate(model, stage: Stage, cfg: Config, device: PipeDevice, d: distributed.Dist, amp_dtype) -> dict:
    """The stage's metrics over the whole validation split, gathered from every rank."""
    loader = eval_loader(cfg, rank=d.rank, world_size=d.world_size, batch_size=cfg.predict.batch_size,
                         device=device, shards=stage.val, tta=stage.tta, amp_dtype=amp_dtype)
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
        rule, rule_f2 = choose_rule(indices, scores, targets, cfg.tune.min_class_examples, stage.seen_classes)
        result.update(val_f2_rule=rule_f2, decision_rule=rule.to_dict())
    return result


def log_epoch(record: dict, val: dict, stage: Stage, improved: bool) -> None:
    extra = f", rule F2 {val['val_f2_rule']:.4f}" if stage.name == "tune" else ""
    if stage.seen_classes is not None:
        unseen = (val.get("decision_rule") or {}).get("unseen_threshold")
        extra += (f" (classes the tuning labels never show: above {unseen:.2f})" if unseen is not None
                  else " (classes the tuning labels never show: the global threshold, none better)")
    log.info(f"{stage.name} epoch {record['epoch']}: loss {record['loss']:.4f}, val GAP {val['val_gap']:.4f}, "
             f"F2 {val['val_f2']:.4f} at {val['val_threshold']:.2f}{extra}, "
             f"{record['images_per_s']:.0f} images/s, waiting for data {100 * record['data_wait_share']:.0f}%"
             f"{' (best)' if improved else ''}")


def train(cfg: Config, stage_name: str, init: str | None = None) -> dict:
    """Run (or resume) one stage to its last epoch; returns the last epoch's record."""
    device = resolve_device(cfg.pipeline.device, announce=True)
    apply_thread_budget(cfg.pipeline.num_threads, device.kind == "gpu")
    d = distributed.setup(device)
    try:
        return _run(cfg, stage_name, init, device, d)
    finally:
        distributed.teardown(d)


def _run(cfg: Config, stage_name: str, init: str | None, device: PipeDevice, d: distributed.Dist) -> dict:
    readable_dir(cfg.paths.shards, "paths.shards")
    # before anything is made or written (the tune stage's split, the artifacts folder): a wrong setting fails now
    # (the tuning labels have no machine labels: the tune stage fits on human labels alone)
    check_data_settings(cfg, split_shards(cfg.paths.shards, stage_name), resizes=False,
                        machine_labels=cfg.data.machine_labels and stage_name == "train")
    LOSSES[cfg.train.loss](cfg.train)  # its settings are checked as it is made
    if d.is_main:
        writable_dir(cfg.paths.artifacts, "paths.artifacts")
    if init:
        readable_file(Path(init), "--init")
    if cfg.model.compile and cfg.model.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(f"model.compile_backend {cfg.model.compile_backend!r} is not a torch.compile backend "
                        f"(inductor, eager, ...: torch._dynamo.list_backends())")
    if device.kind == "gpu":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    stage = make_stage(cfg, stage_name, d)
    check_data_settings(cfg, stage.val, resizes=True)
    if cfg.data.machine_labels and d.is_main:
        log.info(f"{stage.name}: " + (f"fitting on the human and the machine labels ({cfg.train.loss} loss, machine "
                 f"positives from confidence {cfg.train.machine_label_floor})" if stage.machine_labels
                 else "fitting on the tuning labels alone (they have no machine labels)"))
    vocab = Vocabulary.load(cfg.paths.shards)
    counts = read_manifest(cfg.paths.shards).get("class_counts", {}).get("train")  # inference's fallback labels
    amp_dtype = autocast_dtype(device.kind == "gpu", cfg.model.amp, cfg.model.amp_dtype)
    make_loader = partial(train_loader, cfg, rank=d.rank, world_size=d.world_size, batch_size=cfg.train.batch_size,
                           device=device, shards=stage.fit, amp_dtype=amp_dtype, machine_labels=stage.machine_labels)
    steps = steps_per_epoch(cfg, stage, d)
    state = create_train_state(cfg, stage, len(vocab), device.torch_device, amp_dtype, steps, d.world_size)
    saver = CheckpointSaver(stage, cfg, vocab.codes, counts, d)
    dali_checkpoint = resume_or_init(state, saver, cfg, stage, init, d)
    if state.epoch >= stage.epochs:
        choose_resolution(cfg, stage, device, d, amp_dtype)  # a run stopped while choosing it chooses it now
        return {}
    # one pipeline for the whole run: built once, resumed from its own checkpoint where there is one
    loader = make_loader(epoch=state.epoch, checkpoint=dali_checkpoint)
    assert len(loader) >= steps, (len(loader), steps)  # the schedule was made for this many steps
    batches = loader.stream()
    net = state.model
    if d.active:
        net = DistributedDataParallel(net, device_ids=[device.device_id] if device.kind == "gpu" else None)
    if cfg.model.compile:
        net = torch.compile(net, backend=cfg.model.compile_backend)  # after DDP, so that it sees DDP's buckets
    metrics = MetricsLog(stage.out, d.is_main, state.step)
    record: dict = {}
    try:
        while state.epoch < stage.epochs:
            train_one_epoch(net, batches, loader, state, stage, cfg, device, d, amp_dtype, steps, metrics, saver)
            epoch, lr = state.progress, state.progress.lr
            # each rank's last forward updated its BatchNorm statistics with its own batch: validate (and save)
            # rank 0's on every rank, as DDP itself does at the start of each forward
            distributed.broadcast_buffers(d, state.model)
            val = validate(state.model, stage, cfg, device, d, amp_dtype)
            seen = distributed.gather_objects(d, epoch.seen)
            state.epoch += 1
            record = {"stage": stage.name, "epoch": state.epoch, "step": state.step, "loss": epoch.loss_sum / steps,
                      "lr": lr, "images_per_s": sum(seen) / epoch.seconds,
                      "data_wait_share": epoch.wait / epoch.seconds,
                      **{k: v for k, v in val.items() if k != "decision_rule"},
                      "samples_per_rank": seen,
                      "process_group": distributed.backend(d)}
            state.progress = EpochProgress()
            improved = saver.save(state, loader, val[stage.metric], val.get("decision_rule"))
            if d.is_main:
                metrics.write(record, state.step)
                log_epoch(record, val, stage, improved)
            distributed.barrier(d)
        choose_resolution(cfg, stage, device, d, amp_dtype)
    finally:
        metrics.close()
    return record


RESOLUTION_REPORT = "test_resolutions.json"


def choose_resolution(cfg: Config, stage: Stage, device: PipeDevice, d: distributed.Dist, amp_dtype) -> None:
    """Tune stage, after its last epoch: predict the hold-out's full-size originals with ``best.pt``'s model at
    each of ``tune.test_resolutions`` (as a submission reads test images, with ``predict.tta``), choose a rule at
    each, and make ``best.pt``'s rule the best one, its resolution with it; every candidate's F2 goes to
    ``test_resolutions.json`` and the log. Done on rank 0, once per set of candidates: a ``best.pt`` whose
    resolution was chosen from the same candidates and TTA is kept, other candidates choose again."""
    if stage.name != "tune" or not cfg.tune.test_resolutions:
        return
    best_path = stage.checkpoints / "best.pt"
    if d.is_main and best_path.is_file():
        saved = load_checkpoint(best_path)
        chosen = DecisionRule.from_dict(saved["decision_rule"]).test_resolution
        if chosen is not None and resolution_report_matches(stage.out / RESOLUTION_REPORT, cfg):
            log.info("tune: test resolution %d/%d already chosen from these candidates (%s)", *chosen,
                     stage.out / RESOLUTION_REPORT)
        else:
            model = model_from_checkpoint(saved, cfg.model.channels_last).to(device.torch_device).eval()
            files, targets = holdout_originals(cfg.paths.shards, cfg.paths.competition_data, stage.out / "data")

            def predict(resolution):
                loader = ImageFileLoader(cfg, files, tta=cfg.predict.tta, device=device, amp_dtype=amp_dtype,
                                         resolution=resolution)
                parts = [(idx, sc, pos.numpy()) for idx, sc, (pos,) in predict_topk(
                    model, loader, cfg.predict.top_k, lambda x: prepare_input(x, cfg), amp_dtype)]
                order = np.argsort(np.concatenate([p[2] for p in parts]))  # back to the files' order
                return (np.concatenate([p[0] for p in parts])[order], np.concatenate([p[1] for p in parts])[order])

            best, trials = choose_test_resolution(cfg.tune.test_resolutions, predict, targets,
                                                  cfg.tune.min_class_examples, stage.seen_classes)
            report = {"holdout_images": len(files), "tta": cfg.predict.tta,
                      "candidates": [{"short_side": t.resolution[0], "crop": t.resolution[1], "f2": round(t.f2, 5)}
                                     for t in trials],
                      "chosen": {"short_side": best.resolution[0], "crop": best.resolution[1]}}
            saved["decision_rule"] = best.rule.to_dict()
            save_checkpoint(best_path, saved)
            atomic_write_text(stage.out / RESOLUTION_REPORT, json.dumps(report, indent=1) + "\n")
            log.info("tune: test resolution chosen on the hold-out's %d originals: %s; chosen %d/%d, saved with "
                     "the rule in %s", len(files), ", ".join(f"{t.resolution[0]}/{t.resolution[1]} F2 {t.f2:.4f}"
                                                            for t in trials), *best.resolution, best_path)
    distributed.barrier(d)


def resolution_report_matches(path, cfg: Config) -> bool:
    """Whether ``test_resolutions.json`` was written for the configured candidates and TTA."""
    try:
        report = json.loads(path.read_text())
        asked = [(c["short_side"], c["crop"]) for c in report["candidates"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return asked == [tuple(c) for c in cfg.tune.test_resolutions] and report.get("tta") == cfg.predict.tta


def steps_per_epoch(cfg: Config, stage: Stage, d: distributed.Dist) -> int:
    """Steps each rank takes per epoch, known before the loader is built (the schedule needs it first):
    DALI's count of whole batches for a dropped last batch, equal on every rank, or fewer."""
    steps = stage.fit.samples // d.world_size // cfg.train.batch_size
    if steps == 0:
        raise UserError(f"the '{stage.name}' data has {stage.fit.samples} images for {d.world_size} process(es), "
                        f"fewer than one batch of {cfg.train.batch_size} each; lower train.batch_size")
    return min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps


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
