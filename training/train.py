"""Train SE-ResNet101 on the train shards, or fine-tune it on the stage-1 tuning labels.

    python -m training.train --config config.yaml --stage train|tune [--set k=v ...] [--init CKPT]
    scripts/train.sh --nproc-per-node 8 -- --config config.yaml --stage train     # all GPUs (torchrun)

Each stage is a ``training.stages.StageSpec``: the train stage runs on every process (global batch and learning
rate grow with them), the tune stage on one whatever the launcher started. Writes ``paths.artifacts/<stage>/``:
``checkpoints/last.pt`` every epoch, ``checkpoints/best.pt`` by validation GAP (train: on ``val``; tune: on its
hold-out, after which the decision rule is chosen there and saved in it: ``training.rule_choice``), ``tb/``
(TensorBoard) and ``metrics.jsonl``. Run again, it resumes from ``last.pt``. The tune stage starts from the train
stage's ``best.pt`` unless ``--init`` names another checkpoint.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from common import distributed
from common.atomic import atomic_write_text
from common.cli import command, config_from_args, config_parser
from common.errors import UserError, writing
from common.log import progress as progress_bar
from common.paths import readable_dir, writable_dir
from common.runtime import Runtime, start_runtime
from common.seeds import int_seed
from common.shard_format import SplitShards, read_manifest
from common.vocab import Vocabulary
from dali_pipes.loader import ForeignState, check_data_settings, train_graph, train_loader
from dali_pipes.settings import PipeSettings
from model.checkpoint import (FOR_RESUME, load_checkpoint, load_weights, rank_rng_state, restore_scaler, rng_state,
                              save_checkpoint, set_rng_state, training_payload)
from model.network import create_model
from training.losses import make_loss
from training.rule_choice import choose_after_fit
from training.stages import STAGES, StageSpec
from training.validation import validate

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    pass


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
    scaler: torch.amp.GradScaler
    epoch: int = 0  # finished epochs
    step: int = 0  # steps of the stage so far
    best_metric: float = -1.0
    progress: EpochProgress = field(default_factory=EpochProgress)


def create_train_state(spec: StageSpec, model_cfg, num_classes: int, device: torch.device, amp_dtype,
                       seed: int) -> TrainState:
    torch.manual_seed(int_seed(seed, "model_init"))  # dropout draws from it too
    model = create_model(model_cfg.name, num_classes, model_cfg.channels_last, model_cfg.drop_rate).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr(0.0), momentum=spec.momentum, nesterov=spec.nesterov,
                          weight_decay=spec.weight_decay)
    return TrainState(model, opt, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16))


class CheckpointSaver:
    """Owns the checkpoint payload and the last/best paths (timm's CheckpointSaver, kept small)."""

    def __init__(self, spec: StageSpec, model_name: str, classes: list[str], class_counts: list[int] | None,
                 config: dict, d: distributed.Dist, graph: str):
        self.spec, self.model_name, self.config, self.d, self.graph = spec, model_name, config, d, graph
        self.classes, self.class_counts = classes, class_counts
        self.last, self.best = spec.checkpoints / "last.pt", spec.checkpoints / "best.pt"
        self.holdout = spec.data.holdout()  # the images a rule is chosen on (ensembles must choose on the same)

    def save(self, state: TrainState, loader, metric: float | None = None) -> bool:
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
            model=state.model, optimizer=state.optimizer, lr_schedule=asdict(self.spec.lr), scaler=state.scaler,
            stage=self.spec.name, epoch=state.epoch, step=state.step, metric=metric,
            best_metric=state.best_metric, model_name=self.model_name, classes=self.classes,
            class_counts=self.class_counts, decision_rule=None, config=self.config,
            epoch_progress=asdict(state.progress), dali=list(dali), dali_graph=self.graph, rng_per_rank=list(rngs),
            world_size=self.d.world_size, holdout=self.holdout)
        save_checkpoint(self.last, payload)
        if improved:
            save_checkpoint(self.best, payload)
        return improved


def restart_epoch(state: TrainState, why: str) -> None:
    """The resumed epoch from its beginning: last.pt's data position cannot be used (``why``)."""
    if state.progress.step:
        log.warning("last.pt %s: epoch %d starts again from its beginning (its first %d steps are trained again)",
                    why, state.epoch + 1, state.progress.step)
    state.step -= state.progress.step
    state.progress = EpochProgress()


def resume_or_init(state: TrainState, saver: CheckpointSaver, spec: StageSpec, d: distributed.Dist) -> str | None:
    """Resume exactly from ``last.pt`` if there is one (returning this rank's DALI checkpoint, if it can be
    used); else start from ``spec.init``. The learning rate is a function of the epoch, so nothing of it is
    restored: a run resumed on another number of processes follows the schedule of its epochs."""
    if saver.last.is_file():
        saved = load_checkpoint(saver.last, require=FOR_RESUME)
        load_weights(state.model, saved)
        state.optimizer.load_state_dict(saved["optimizer"])
        restore_scaler(state.scaler, saved["scaler"])
        set_rng_state(rank_rng_state(saved, d.rank, d.world_size))
        state.epoch, state.step, state.best_metric = saved["epoch"], saved["step"], saved["best_metric"]
        state.progress = EpochProgress(**saved.get("epoch_progress") or {})
        where = f"epoch {state.epoch + 1}, step {state.progress.step}" if state.progress.step else \
            f"the end of epoch {state.epoch}"
        log.info(f"resuming {spec.name} from {saver.last} at {where}" if state.epoch < spec.epochs
                 else f"{spec.name} already finished its {spec.epochs} epochs ({saver.last})")
        same_graph = saved.get("dali_graph", saver.graph) == saver.graph  # (older checkpoints: DALI will tell)
        if saved.get("world_size") == d.world_size and saved.get("dali") and same_graph:
            return saved["dali"][d.rank]
        restart_epoch(state, f"was saved by {saved.get('world_size')} process(es), this run has {d.world_size}"
                      if same_graph else f"holds the state of another train graph ({saved['dali_graph']}; this "
                                         f"run's: {saver.graph})")
    elif spec.init is not None:
        saved = load_checkpoint(spec.init)
        if saved["classes"] != saver.classes:
            raise UserError(f"{spec.init} was trained on another class list than {spec.data.shards}")
        load_weights(state.model, saved)
        log.info("%s: starting from %s", spec.name, spec.init)
    return None


class MetricsLog:
    """metrics.jsonl and TensorBoard, on rank 0 only; each record with its wall time. Records after
    ``resumed_step`` (written by a run that stopped before its next checkpoint) are dropped, and so is a last line
    torn by a kill or a full disk, so a resumed run's file reads like an uninterrupted one's."""

    def __init__(self, out: Path, enabled: bool, resumed_step: int):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            out.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept, torn = [], 0
                for line in self.path.read_text().splitlines(keepends=True):
                    try:
                        if json.loads(line)["step"] <= resumed_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        torn += bool(line.strip())
                if torn:
                    log.warning("%s: %d unreadable record(s) dropped (a run stopped while writing)", self.path, torn)
                atomic_write_text(self.path, "".join(kept))
            self.tb = SummaryWriter(str(out / "tb"), purge_step=resumed_step + 1)

    def write(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {**record, "wall_time": round(time.time(), 3)}
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        with writing(self.path.parent / "tb"):  # its writer thread's full disk surfaces here
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step", "wall_time"):
                    self.tb.add_scalar(k, v, step, walltime=record["wall_time"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()


class LossWatch:
    """The loss summed on the device, read back only at a flush (every ``log_every`` steps, at a checkpoint and at
    an epoch's end): a read is a host sync, and one per step would keep the CPU from queueing the next step while
    the GPU works. The first non-finite loss is remembered on the device too, so a divergence is still named by
    its step. Under DDP a flush is one all-reduce, so every rank takes the same stop decision."""

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
    """One optimiser step on one batch of model inputs (``Runtime.to_input``'s), as training takes it: the
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


def train_one_epoch(net, batches, loader, state: TrainState, spec: StageSpec, runtime: Runtime, steps: int,
                    metrics: MetricsLog, saver: CheckpointSaver) -> None:
    """The rest of the current epoch: from ``state.progress.step`` to ``steps``, with mid-epoch checkpoints; the
    learning rate set before each step from the schedule at ``epoch + step / steps``."""
    loss_fn = make_loss(spec.loss, spec.machine_label_floor)
    progress, d = state.progress, runtime.dist
    watch = LossWatch(runtime.device.torch_device)

    def flush(log_now: bool) -> None:
        total, count, bad_step, bad_value = watch.flush(d)
        if bad_step is not None:
            raise TrainingDiverged(
                f"{spec.name}: the loss is {bad_value} at epoch {state.epoch + 1}, step {bad_step}; stopped. "
                f"The last good checkpoint is {saver.last if saver.last.exists() else 'none yet'}; "
                f"lower the learning rate ({spec.name}.lr)")
        progress.loss_sum += total
        progress.log_sum += total
        progress.log_steps += count
        if log_now and progress.log_steps:
            loss = progress.log_sum / progress.log_steps
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            metrics.write({"stage": spec.name, "epoch": state.epoch + 1, "step": state.step, "loss": loss,
                           "lr": progress.lr}, state.step)
            progress.log_sum, progress.log_steps = 0.0, 0

    started = time.perf_counter() - progress.seconds
    with progress_bar(log, total=steps, initial=progress.step, unit="step",
                      desc=f"{spec.name} epoch {state.epoch + 1}/{spec.epochs}") as bar:
        while progress.step < steps:
            progress.lr = spec.lr(state.epoch + progress.step / steps)
            for group in state.optimizer.param_groups:
                group["lr"] = progress.lr
            t_wait = time.perf_counter()
            images, targets = next(batches)
            progress.wait += time.perf_counter() - t_wait
            loss = training_step(net, state.optimizer, state.scaler, loss_fn, runtime.to_input(images), targets,
                                 runtime.amp_dtype)
            watch.add(loss, progress.step)
            progress.step += 1
            progress.seen += len(images)
            state.step += 1
            bar.update(1)
            at_log = state.step % spec.log_every == 0
            at_checkpoint = spec.checkpoint_every_steps and state.step % spec.checkpoint_every_steps == 0
            if at_log or at_checkpoint or progress.step == steps:
                flush(at_log)  # before any checkpoint: a diverged state is never saved
            if at_checkpoint and progress.step < steps:  # (the epoch's end saves after validation)
                progress.seconds = time.perf_counter() - started
                saver.save(state, loader)
    progress.seconds = time.perf_counter() - started


def log_epoch(spec: StageSpec, record: dict, improved: bool) -> None:
    log.info(f"{spec.name} epoch {record['epoch']}/{spec.epochs}: loss {record['loss']:.4f}, lr {record['lr']:.3g}, "
             f"val GAP {record['val_gap']:.4f}, F2 {record['val_f2']:.4f} at {record['val_threshold']:.2f}, "
             f"{record['images_per_s']:.0f} images/s, waiting for data {100 * record['data_wait_share']:.0f}%"
             f"{' (best)' if improved else ''}")


def train(cfg, stage_name: str, init: str | None = None) -> dict:
    """Run (or resume) one stage to its last epoch, then its after-fit work; returns the last epoch's record."""
    with start_runtime(cfg, distributed_run=True) as runtime:
        spec = STAGES[stage_name](cfg, runtime.dist.world_size, init)
        started = runtime.dist.world_size
        if spec.processes < started:
            runtime = runtime.main_alone()  # the other ranks' work ends here
            if runtime is None:
                return {}
        return run_stage(spec, runtime, PipeSettings.from_config(cfg, runtime), cfg.model, cfg.to_dict(), started)


def check_settings(spec: StageSpec, model_cfg, is_main: bool) -> None:
    """What would fail later, before anything is made or written."""
    readable_dir(spec.data.shards, "paths.shards")
    if is_main:
        writable_dir(spec.out.parent, "paths.artifacts")
    if model_cfg.compile and model_cfg.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(f"model.compile_backend {model_cfg.compile_backend!r} is not a torch.compile backend "
                        f"(inductor, eager, ...: torch._dynamo.list_backends())")


def run_stage(spec: StageSpec, runtime: Runtime, pipes: PipeSettings, model_cfg, config: dict, started: int
              ) -> dict:
    """The stage's epochs from where ``last.pt`` left them, then its after-fit work. ``config``: the run's
    settings, recorded in every checkpoint; ``started``: the processes the launcher started."""
    d = runtime.dist
    check_settings(spec, model_cfg, d.is_main)
    fit, val = spec.data.open()
    check_data_settings(pipes, fit, resizes=False, machine_labels=spec.machine_labels)
    check_data_settings(pipes, val, resizes=True)
    if runtime.on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    steps = spec.steps_per_epoch(fit.samples)
    if d.is_main:
        log.info(spec.describe(steps, started))
        for line in spec.shortfalls():
            log.warning(line)
        if spec.machine_labels:
            log.info(f"{spec.name}: fitting on the human and the machine labels ({spec.loss} loss, machine positives "
                     f"from confidence {spec.machine_label_floor})")
    vocab = Vocabulary.load(spec.data.shards)
    counts = read_manifest(spec.data.shards).get("class_counts", {}).get("train")  # inference's fallback labels
    state = create_train_state(spec, model_cfg, len(vocab), runtime.device.torch_device, runtime.amp_dtype,
                               pipes.seed)
    saver = CheckpointSaver(spec, model_cfg.name, vocab.codes, counts, config, d,
                            train_graph(pipes, spec.machine_labels, spec.resizes))
    dali_checkpoint = resume_or_init(state, saver, spec, d)
    record: dict = {}
    if state.epoch < spec.epochs:
        record = fit_epochs(spec, runtime, pipes, model_cfg, state, saver, fit, val, steps, dali_checkpoint)
    if spec.rule is not None:
        choose_after_fit(spec, val, runtime, pipes)
    return record


def fit_epochs(spec: StageSpec, runtime: Runtime, pipes: PipeSettings, model_cfg, state: TrainState,
               saver: CheckpointSaver, fit: SplitShards, val: SplitShards, steps: int, dali_checkpoint) -> dict:
    d = runtime.dist

    def loader_for(epoch: int, checkpoint: str | None):
        """The train pipeline at ``epoch``'s crop side, going on from ``checkpoint`` (DALI's state passes from one
        side's pipeline to the next: the graphs differ only in the resize's size)."""
        side = spec.resolution(epoch) if spec.resizes else None
        made = train_loader(pipes, fit, spec.batch_size, d.rank, d.world_size, epoch, checkpoint, spec.machine_labels,
                            side)
        assert len(made) >= steps, (len(made), steps)  # the schedule was made for this many steps
        return made

    # one pipeline for the run (one per crop side), resumed from its own checkpoint where there is one
    try:
        loader = loader_for(state.epoch, dali_checkpoint)
    except ForeignState as exc:  # a last.pt from before checkpoints named their graph, saved by another graph
        restart_epoch(state, f"holds the state of another train graph (DALI: {exc})")
        loader = loader_for(state.epoch, None)
    batches = loader.stream()
    net = state.model
    if d.active:
        net = DistributedDataParallel(net, device_ids=[runtime.device.device_id] if runtime.on_gpu else None)
    if model_cfg.compile:  # after DDP, so that it sees DDP's buckets; one static graph per crop side
        net = torch.compile(net, backend=model_cfg.compile_backend, dynamic=False if spec.resizes else None)
    metrics = MetricsLog(spec.out, d.is_main, state.step)
    record: dict = {}
    try:
        while state.epoch < spec.epochs:
            if spec.resolution(state.epoch) != loader.size:
                if d.is_main:
                    log.info(f"{spec.name} epoch {state.epoch + 1}: crops of {spec.resolution(state.epoch)} px from "
                             f"here on (was {loader.size})")
                loader = loader_for(state.epoch, loader.checkpoint())
                batches = loader.stream()
            train_one_epoch(net, batches, loader, state, spec, runtime, steps, metrics, saver)
            epoch = state.progress
            # each rank's last forward updated its BatchNorm statistics with its own batch: validate (and save)
            # rank 0's on every rank, as DDP itself does at the start of each forward
            distributed.broadcast_buffers(d, state.model)
            val_record = validate(state.model, val, spec.validation, runtime, pipes)
            seen = distributed.gather_objects(d, epoch.seen)
            state.epoch += 1
            record = {"stage": spec.name, "epoch": state.epoch, "step": state.step, "steps": steps,
                      "loss": epoch.loss_sum / steps,
                      "lr": epoch.lr, "images_per_s": sum(seen) / epoch.seconds,
                      "data_wait_share": epoch.wait / epoch.seconds, **val_record, "samples_per_rank": seen,
                      "global_batch": spec.global_batch, "resolution": loader.size,
                      "process_group": distributed.backend(d)}
            state.progress = EpochProgress()
            improved = saver.save(state, loader, val_record[spec.best_by])
            if d.is_main:
                metrics.write(record, state.step)
                log_epoch(spec, record, improved)
            distributed.barrier(d)
    finally:
        metrics.close()
    return record


@command(batch_keys="train.batch_size (per process) or tune.batch_size, or predict.batch_size for validation")
def main(argv=None):
    parser = config_parser("python -m training.train", __doc__)
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--init", metavar="CKPT", help="start from these weights (tune default: train's best.pt)")
    args = parser.parse_args(argv)
    train(config_from_args(args), args.stage, args.init)


if __name__ == "__main__":
    main()
