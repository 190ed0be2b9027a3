"""The two stages as data: what each fits and validates on, with which batch and on how many processes, its
optimiser and learning-rate schedule, what picks its ``best.pt``, and the work done after its last epoch. The
training loop (``training.train``) takes a ``StageSpec`` and never asks which stage it is.

The original recipe at any number of processes:

- train: each process takes ``train.batch_size`` images a step, so N processes train on a global batch N times the
  original's; the learning rate grows with it (``train.lr_scaling: linear``: ``train.lr`` x global batch /
  ``train.lr_reference_batch``) and rises to that value from ``train.lr`` over ``train.warmup_epochs`` (Goyal et
  al. 2017). On one process the factor is 1 and nothing warms up: exactly the original.
- tune: its ~700 images at a global batch of 32 are about 21 steps an epoch; split over 8 GPUs they would be 2
  at the same batch per process, or 4 images a GPU and BatchNorm over 4. So the tune stage trains on one process
  whatever the launcher started (the others leave at its start): the original's batch and steps at any count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.paths import readable_file
from common.shard_format import SplitShards, split_shards
from common.tune_split import holdout_fingerprint, holdout_ids, split_tune_shards
from dali_pipes.settings import ResolutionSchedule


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate as a function of the (fractional) epoch, ``epoch + step / steps_per_epoch``: so a run
    resumed on another number of processes, whose epochs have other numbers of steps, decays at the same epochs."""
    base: float  # the configured learning rate
    peak: float  # after scaling with the global batch (= base without scaling)
    warmup_epochs: float  # from base up to peak, linearly (nothing to do where peak <= base)
    step_epochs: int  # times ``gamma`` every this many epochs; 0: never
    gamma: float

    def __call__(self, epoch: float) -> float:
        lr = self.peak
        if epoch < self.warmup_epochs and self.peak > self.base:
            lr = self.base + (self.peak - self.base) * epoch / self.warmup_epochs
        return lr * (self.gamma ** (int(epoch) // self.step_epochs) if self.step_epochs else 1.0)

    def describe(self) -> str:
        text = f"lr {self.peak:g}"
        if self.peak != self.base:
            text += f" ({self.base:g} x {self.peak / self.base:g}, linear scaling"
            warms = self.warmup_epochs and self.peak > self.base
            text += f"; warm-up from {self.base:g} over {self.warmup_epochs:g} epochs)" if warms else ")"
        return text + (f", x{self.gamma:g} every {self.step_epochs} epochs" if self.step_epochs else ", constant")


@dataclass(frozen=True)
class TriangularLr:
    """FFCV's linear ramp: from 1e-4 of the peak up to the peak at ``peak_epoch``, then down to 0 at ``epochs``."""
    base: float
    peak: float
    peak_epoch: float
    epochs: int

    def __call__(self, epoch: float) -> float:
        return float(np.interp(epoch, [0, self.peak_epoch, self.epochs], [1e-4 * self.peak, self.peak, 0.0]))

    def describe(self) -> str:
        scaled = f" ({self.base:g} x {self.peak / self.base:g}, linear scaling)" if self.peak != self.base else ""
        return f"lr up to {self.peak:g}{scaled} at epoch {self.peak_epoch:g}, down to 0 at epoch {self.epochs}"


@dataclass(frozen=True)
class ShardSplits:
    """Fit on one split of the shards, validate on another."""
    shards: Path
    fit_split: str = "train"
    val_split: str = "val"

    def open(self) -> tuple[SplitShards, SplitShards]:
        return split_shards(self.shards, self.fit_split), split_shards(self.shards, self.val_split)

    def holdout(self) -> dict | None:
        return None


@dataclass(frozen=True)
class TuneSplit:
    """The tune split, cut into a part to fit and a hold-out (``common.tune_split``) and repacked into ``folder``
    (by the one process that trains on it)."""
    shards: Path
    folder: Path
    holdout_fraction: float
    seed: int  # data.seed: every ensemble member holds out the same images

    def open(self) -> tuple[SplitShards, SplitShards]:
        return split_tune_shards(self.shards, self.folder, self.holdout_fraction, self.seed)

    def holdout(self) -> dict | None:
        """Which images the rule is chosen on (checkpoints record it; an ensemble must choose on the same)."""
        return holdout_fingerprint(holdout_ids(self.folder))


@dataclass(frozen=True)
class Validation:
    """How a stage's model is scored each epoch (and how its rule is chosen): the views, the top-k, the batch."""
    tta: str  # none | flip | tencrop
    top_k: int
    batch_size: int
    max_labels: int


@dataclass(frozen=True)
class RuleChoice:
    """After the last epoch: the decision rule (and, with ``test_resolutions``, the test resolution) chosen on
    ``best.pt``'s predictions of the hold-out, with its F2 cross-fitted over ``folds`` folds beside the F2 on the
    images that chose it."""
    min_class_examples: int
    unseen_class_threshold: bool  # one more threshold for the classes the tuning labels never show
    folds: int
    seed: int
    test_resolutions: tuple[tuple[int, int], ...]
    originals: Path  # where the hold-out's full-size originals are (stage_1_test_images/ beside it)


@dataclass(frozen=True)
class StageSpec:
    name: str  # its folder under paths.artifacts and its config section, in messages
    data: ShardSplits | TuneSplit
    epochs: int
    batch_size: int  # per process
    processes: int  # the processes that train it
    lr: LrSchedule | TriangularLr
    resolution: ResolutionSchedule  # each epoch's crop side; the crops are the window_px window, resized
    window_px: int  # pipeline.crop_size: the side of the window each crop is cut from
    momentum: float
    nesterov: bool
    weight_decay: float
    loss: str
    machine_label_floor: float
    machine_labels: bool  # fit on the shards' machine labels too
    validation: Validation
    max_steps_per_epoch: int  # 0: the whole split
    log_every: int
    checkpoint_every_steps: int
    out: Path
    init: Path | None  # the weights it starts from when it has no last.pt of its own (None: random)
    best_by: str = "val_gap"  # the validation figure that picks best.pt: rule-free, so no rule is judged on itself
    rule: RuleChoice | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes

    @property
    def resizes(self) -> bool:
        return self.resolution.resizes(self.epochs, self.window_px)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def steps_per_epoch(self, samples: int) -> int:
        """Steps each process takes per epoch: DALI's count of whole batches per rank (the last partial one
        dropped, equal on every rank), or ``max_steps_per_epoch``."""
        steps = samples // self.processes // self.batch_size
        if steps == 0:
            raise UserError(f"the '{self.name}' data has {samples} images for {self.processes} process(es), fewer "
                            f"than one batch of {self.batch_size} each; lower {self.name}.batch_size")
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch else steps

    def shortfalls(self) -> list[str]:
        """What the stage's schedules promise and its epochs do not reach (a short run), one line each."""
        out, last = [], self.epochs - 1
        warmup = getattr(self.lr, "warmup_epochs", 0)
        if warmup > self.epochs and self.lr.peak > self.lr.base:
            out.append(f"{self.name}: the warm-up lasts {warmup:g} epochs, the stage {self.epochs}: the rate reaches "
                       f"{self.lr(last + 1 - 1e-9):.3g}, not {self.lr.peak:g}")
        if self.resolution(last) != self.resolution.end:
            out.append(f"{self.name}: the resolution schedule ends after the stage's last epoch: its crops reach "
                       f"{self.resolution(last)} px, not {self.resolution.end} (the tune stage trains at "
                       f"{self.resolution.end})")
        return out

    def describe(self, steps: int, started: int) -> str:
        """The one line each stage starts with: processes, batches, learning rate, steps."""
        alone = f" (of {started} started: this stage trains on one)" if self.processes < started else ""
        sizes = self.resolution.sizes(self.epochs)
        crops = (f", crops of {' -> '.join(map(str, sizes))} px (epochs {self.resolution.start_epoch + 1} to "
                 f"{self.resolution.end_epoch + 1}) from the {self.window_px}-px window" if len(sizes) > 1 else
                 f", {sizes[0]}-px crops" + (f" from the {self.window_px}-px window" if self.resizes else ""))
        return (f"{self.name}: {self.processes} process(es){alone}, global batch {self.global_batch} "
                f"({self.batch_size} per process), {self.lr.describe()}{crops}, {steps} steps an epoch, "
                f"{self.epochs} epochs")


def _schedule(section, global_batch: int, scaling: str = "none", reference: int = 32) -> LrSchedule | TriangularLr:
    peak = section.lr * global_batch / reference if scaling == "linear" else section.lr
    if section.lr_schedule == "triangular":
        return TriangularLr(section.lr, peak, section.lr_peak_epoch, section.epochs)
    return LrSchedule(section.lr, peak, section.warmup_epochs, section.lr_step_epochs, section.lr_gamma)


def _common(cfg, section, processes: int, schedule, resolution: ResolutionSchedule) -> dict:
    return dict(epochs=section.epochs, batch_size=section.batch_size, processes=processes, lr=schedule,
                resolution=resolution, window_px=cfg.pipeline.crop_size,
                momentum=section.momentum, nesterov=section.nesterov, weight_decay=section.weight_decay,
                loss=section.loss, max_steps_per_epoch=section.max_steps_per_epoch, log_every=section.log_every,
                checkpoint_every_steps=section.checkpoint_every_steps)


def train_stage(cfg, world_size: int, init: str | None = None) -> StageSpec:
    """SE-ResNet101 from random weights (or ``--init``) on the train split, on every process."""
    t = cfg.train
    schedule = _schedule(t, t.batch_size * world_size, t.lr_scaling, t.lr_reference_batch)
    return StageSpec(name="train", data=ShardSplits(cfg.paths.shards), machine_label_floor=t.machine_label_floor,
                     machine_labels=cfg.data.machine_labels,
                     validation=Validation("none", cfg.predict.top_k, cfg.predict.batch_size, cfg.predict.max_labels),
                     out=cfg.paths.artifacts / "train", init=readable_file(Path(init), "--init") if init else None,
                     **_common(cfg, t, world_size, schedule, ResolutionSchedule.from_config(cfg)))


def tune_stage(cfg, world_size: int, init: str | None = None) -> StageSpec:
    """Fine-tuning on the tuning labels, on one process, from the train stage's best.pt (or ``--init``), at the train
    stage's final crop side; its hold-out picks best.pt by GAP, then chooses the decision rule (on the submission's
    views)."""
    t = cfg.tune
    start = Path(init) if init else cfg.paths.artifacts / "train" / "checkpoints" / "best.pt"
    if not init and not start.is_file():
        raise UserError(f"the tune stage starts from {start}: run --stage train first or pass --init CKPT")
    out = cfg.paths.artifacts / "tune"
    rule = RuleChoice(t.min_class_examples, t.unseen_class_threshold, t.rule_folds, cfg.data.seed,
                      tuple(tuple(r) for r in t.test_resolutions), cfg.paths.competition_data)
    return StageSpec(name="tune", data=TuneSplit(cfg.paths.shards, out / "data", t.holdout_fraction, cfg.data.seed),
                     machine_label_floor=1.0, machine_labels=False,
                     validation=Validation(cfg.predict.tta, cfg.predict.top_k, cfg.predict.batch_size,
                                           cfg.predict.max_labels),
                     out=out, init=readable_file(start, "--init"), rule=rule,
                     **_common(cfg, t, 1, _schedule(t, 32), ResolutionSchedule.from_config(cfg, final_only=True)))


STAGES = {"train": train_stage, "tune": tune_stage}
