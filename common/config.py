"""The settings: a pydantic model per config section, the one home of every key's type and default (the original
solution's; ``config.yaml`` restates them, and a test keeps the two equal). A YAML file may begin ``extends:
other.yaml``; ``--set section.key=value`` changes one value; relative paths are relative to the file that sets them
(to the current folder for ``--set``). An unknown key, a wrong value or an old key name is one line naming the key.
Pydantic rather than OmegaConf: it checks ranges and choices and names the rule a value broke; OmegaConf's structured
configs check types alone."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      model_validator)

from common.errors import UserError, reading



class ConfigError(UserError):
    pass


def _not_bool(value):
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def _crop_fits(pair: tuple[int, int]) -> tuple[int, int]:
    if pair[1] > pair[0]:
        raise ValueError("must be [short side, crop] with the crop at most the short side, e.g. [292, 256]")
    return pair


def number(**bounds):  # a float within pydantic's gt/ge/lt/le bounds: an integer is taken, true or false is not
    return Annotated[float, BeforeValidator(_not_bool), Field(**bounds)]


def integer(**bounds):  # an integer within bounds: 2.0, "2" and true are not
    return Annotated[int, Strict(), Field(**bounds)]


Bool = Annotated[bool, Strict()]
TestResolution = Annotated[tuple[integer(gt=0), integer(gt=0)], AfterValidator(_crop_fits)]  # [short side, crop]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    original_images: Path = Path("/original_images")  # holds train/<ImageID>.jpg
    competition_data: Path = Path("/inclusive")  # Kaggle CSVs, stage_1_test_images/, stage_2_test_images/
    shards: Path = Path("/shards")
    artifacts: Path = Path("/artifacts")
    output: Path = Path("/output")


class Data(Section):
    """Read by preprocessing; ``seed`` seeds the splits, and training too unless ``train.seed`` is set."""
    shortest_side: integer(gt=0) = 256
    jpeg_quality: integer(ge=1, le=100) = 95
    val_fraction: number(ge=0, lt=1) = 0.01
    seed: integer() = 0xDEADFACE
    shard_max_samples: integer(gt=0) = 2000
    reduced_decode: Bool = True
    machine_labels: Bool = False


class Pipeline(Section):
    """Read by dali_pipes (through ``dali_pipes.settings.PipeSettings``)."""
    device: Literal["auto", "gpu", "cpu"] = "auto"
    crop_size: integer(gt=0) = 224
    augmentation: Literal["crop_flip", "random_resized_crop"] = "crop_flip"
    dtype: Literal["auto", "float16", "float32", "uint8"] = "auto"
    num_threads: integer(gt=0) = 4
    prefetch_queue_depth: integer(gt=0) = 2
    shuffle_buffer: integer(gt=0) = 4096
    mean: tuple[number(), number(), number()] = (0.485, 0.456, 0.406)
    std: tuple[number(), number(), number()] = (0.229, 0.224, 0.225)
    baseline_workers: integer(ge=0) = 0


class Model(Section):
    name: str = Field("seresnet101", min_length=1)
    drop_rate: number(ge=0, lt=1) = 0.0
    channels_last: Bool = True
    compile: Bool = False
    compile_backend: str = Field("inductor", min_length=1)
    amp: Bool = True
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"


class Resolution(Section):
    """The train stage's crops at ``start`` px until ``start_epoch``, rising linearly to ``end`` px at ``end_epoch``
    in multiples of ``step`` (FFCV's ramp)."""
    start: integer(gt=0)
    end: integer(gt=0)
    start_epoch: integer(ge=0)
    end_epoch: integer(ge=0)
    step: integer(gt=0) = 32

    @model_validator(mode="after")
    def _ordered(self):
        if not (self.start <= self.end and self.start_epoch <= self.end_epoch):
            raise ValueError("must rise: start <= end and start_epoch <= end_epoch")
        return self


class Stage(Section):
    """What both stages set, each in its own section: optimiser, schedule, loop."""
    loss: Literal["per_positive_softmax", "bce"] = "per_positive_softmax"
    epochs: integer(gt=0)
    batch_size: integer(gt=0) = 32
    lr: number(gt=0)
    lr_schedule: Literal["step", "triangular"] = "step"  # triangular: up to lr at lr_peak_epoch, down to 0 at the end
    lr_peak_epoch: number(ge=0) = 2.0
    lr_step_epochs: integer(ge=0)  # step: lr *= lr_gamma every lr_step_epochs epochs; 0 = never
    lr_gamma: number(gt=0) = 0.1
    warmup_epochs: number(ge=0) = 0.0
    momentum: number(ge=0, le=1) = 0.9
    nesterov: Bool = True
    weight_decay: number(ge=0) = 1e-4
    max_steps_per_epoch: integer(ge=0) = 0  # 0 = the whole split
    log_every: integer(gt=0) = 50
    checkpoint_every_steps: integer(ge=0) = 0  # also save last.pt mid-epoch every N steps; 0 = at epoch ends only


class Train(Stage):
    epochs: integer(gt=0) = 25
    lr: number(gt=0) = 0.01
    lr_step_epochs: integer(ge=0) = 10
    lr_scaling: Literal["none", "linear"] = "linear"
    lr_reference_batch: integer(gt=0) = 32
    warmup_epochs: number(ge=0) = 5.0
    checkpoint_every_steps: integer(ge=0) = 10000
    seed: integer() | None = None
    machine_label_floor: number(gt=0, le=1) = 0.5
    resolution: Resolution | None = None  # none: every epoch at pipeline.crop_size


class Tune(Stage):
    epochs: integer(gt=0) = 80
    lr: number(gt=0) = 1e-4
    lr_step_epochs: integer(ge=0) = 0
    holdout_fraction: number(gt=0, lt=1) = 0.3
    min_class_examples: integer(gt=0) = 5
    unseen_class_threshold: Bool = True
    test_resolutions: tuple[TestResolution, ...] = ()
    rule_folds: integer(ge=2) = 5


class Predict(Section):
    """What validation (training) and submissions (inference) share."""
    top_k: integer(gt=0) = 150
    tta: Literal["none", "flip", "tencrop"] = "tencrop"
    batch_size: integer(gt=0) = 64
    max_labels: integer(gt=0) = 5
    ensemble_vote: integer(ge=0) = 0


class Submit(Section):
    threshold: number() = 0.55
    min_labels: integer(gt=0) = 2
    max_fallback_fraction: number(ge=0, le=1) = 0.01


class Config(Section):
    """A validated config: ``cfg.paths.shards`` (an absolute Path), ``cfg.train.lr`` ..."""
    paths: Paths = Paths()
    data: Data = Data()
    pipeline: Pipeline = Pipeline()
    model: Model = Model()
    train: Train = Train()
    tune: Tune = Tune()
    predict: Predict = Predict()
    submit: Submit = Submit()
    source: Path | None = Field(None, exclude=True)  # the file it was loaded from
    overrides: tuple[str, ...] = Field((), exclude=True)  # its --set values (messages repeat them)

    @model_validator(mode="after")
    def _crops_fit(self):
        resolution = self.train.resolution
        if resolution and resolution.end > self.pipeline.crop_size:
            raise ConfigError(f"config key 'train.resolution.end' ({resolution.end}) must be at most "
                              f"pipeline.crop_size ({self.pipeline.crop_size}): each epoch's crops are the crop_size "
                              "window, resized")
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        overrides = tuple(overrides)
        return _validated(_apply_sets(self.to_dict(), overrides), self.source, self.overrides + overrides)


SECTIONS = [name for name in Config.model_fields if name not in ("source", "overrides")]
# keys of earlier versions: a config that sets one stops with a line saying what became of it
OLD_KEYS = {**{old: f"is now '{new}': rename it" for old, new in (
    ("train.amp", "model.amp"), ("validation.top_k", "predict.top_k"), ("submit.top_k", "predict.top_k"),
    ("submit.tta", "predict.tta"), ("submit.batch_size", "predict.batch_size"),
    ("submit.max_labels", "predict.max_labels"))},
    "pipeline.layout": "is now 'model.channels_last' (true for NHWC): replace it",
    "data.shard_max_bytes": "is gone (shards hold data.shard_max_samples images each): remove it"}


def _place(raw: dict, dotted: str, value: Any, where: str, base: Path) -> None:
    """One value under its key (a path resolved against ``base``); an unknown or old key is an error."""
    section, _, name = dotted.partition(".")
    name, _, inner = name.partition(".")  # train.resolution.end: one key of a nested mapping
    if dotted in OLD_KEYS:
        raise ConfigError(f"config key '{dotted}' ({where}) {OLD_KEYS[dotted]}")
    fields = Config.model_fields[section].annotation.model_fields if section in SECTIONS else {}
    if name not in fields or inner and not any(isinstance(t, type) and issubclass(t, BaseModel)
                                               for t in (fields[name].annotation, *get_args(fields[name].annotation))):
        raise ConfigError(f"unknown config key '{dotted}' in {where}")
    if section == "paths":
        if not isinstance(value, (str, Path)) or not str(value):
            raise ConfigError(f"config key '{dotted}' must be a path, got {value!r}")
        value = (base / Path(value).expanduser()).resolve()
    values = raw.setdefault(section, {})
    if inner:
        values[name] = {**(values.get(name) or {}), inner: value}
    else:
        values[name] = value


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """One file's values (after those of the file it ``extends``), its relative paths made absolute."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself")
    if not path.is_file():
        raise ConfigError(f"config file {path} is a folder; it must be a YAML file" if path.is_dir()
                          else f"config file not found: {path}")
    try:
        with reading(path, "a YAML config file"):
            data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"config file {path}{f' line {mark.line + 1}' if mark else ''} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    parent = data.pop("extends", None)
    raw = _read_yaml(path.parent / Path(str(parent)).expanduser(), seen + (path,)) if parent else {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config key '{section}' in {path} must be a mapping")
        for name, value in values.items():
            _place(raw, f"{section}.{name}", value, str(path), path.parent)
    return raw


def _apply_sets(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        dotted, equals, text = item.partition("=")
        if not equals:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() and not dotted.startswith("paths.") else text
        except yaml.YAMLError:
            value = text
        _place(raw, dotted.strip(), value, "--set", Path.cwd())
    return raw


def _validated(raw: dict[str, Any], source: Path | None, overrides: tuple[str, ...]) -> Config:
    try:
        return Config(**raw, source=source, overrides=overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(part for part in error["loc"] if isinstance(part, str))
        items = [part for part in error["loc"] if isinstance(part, int)]
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"unknown config key '{key}'") from None
        rule = "is missing" if error["type"] == "missing" else \
            re.sub(r"^(Input|String|Tuple|List) should", "must", error["msg"].removeprefix("Value error, "))
        where = f" item {items[0] + 1}" if items else ""
        raise ConfigError(f"config key '{key}'{where} {rule}, got {error['input']!r}") from None


def load_config(path: str | Path = "config.yaml", overrides: Iterable[str] = ()) -> Config:
    """Read ``path``, apply ``--set`` overrides, validate everything; raise ConfigError on any problem."""
    path, overrides = Path(path), tuple(overrides)
    return _validated(_apply_sets(_read_yaml(path), overrides), path.resolve(), overrides)
