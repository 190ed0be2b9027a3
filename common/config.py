"""Load, validate and override the project's YAML config: the one home of the config schema.

Each section is a frozen dataclass below, so code reads ``cfg.train.lr`` with its type
known and a mistyped key in a YAML file or ``--set`` fails at load with one line. Values
live only in YAML files (``config.yaml`` at the repository root holds the original
solution's values). A file may start with ``extends: other.yaml`` to take every value from
another file and change a few. Relative paths are resolved against the folder of the file
that sets them (or the current directory for ``--set``). Keys that moved keep working under
their old names (``RENAMED``), with a one-line deprecation warning.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from common.errors import UserError, reading

log = logging.getLogger(__name__)


class ConfigError(UserError):
    pass


PATH = "path"
ANY_INT = "int"
POS_INT = "positive int"
NONNEG_INT = "non-negative int"
OPT_INT = "int or null"
FLOAT = "number"
FRACTION = "number in [0, 1)"
SHARE = "number in [0, 1]"
BOOL = "bool"
FLOAT_LIST = "list of numbers"
STR = "str"
RESOLUTIONS = "list of [short side, crop] pairs"


NO_DEFAULT = object()


def key(kind: Any, default: Any = NO_DEFAULT):
    """A config key of the given kind (one of the constants above, or a tuple of choices). Keys added after the
    first release take a ``default``, so that a config file written before them still loads as it did."""
    return field(metadata={"kind": kind, "default": default})


@dataclass(frozen=True)
class Paths:
    original_images: Path = key(PATH)
    competition_data: Path = key(PATH)
    shards: Path = key(PATH)
    artifacts: Path = key(PATH)
    output: Path = key(PATH)


@dataclass(frozen=True)
class Data:
    """Read by preprocessing (shard settings); ``seed`` seeds the splits, and training too unless ``train.seed``."""
    shortest_side: int = key(POS_INT)
    jpeg_quality: int = key(POS_INT)
    val_fraction: float = key(FRACTION)
    seed: int = key(ANY_INT)
    shard_max_samples: int = key(POS_INT)
    reduced_decode: bool = key(BOOL)
    machine_labels: bool = key(BOOL, default=False)


@dataclass(frozen=True)
class Pipeline:
    """Read by dali_pipes."""
    device: str = key(("auto", "gpu", "cpu"))
    crop_size: int = key(POS_INT)
    augmentation: str = key(("crop_flip", "random_resized_crop"))
    dtype: str = key(("auto", "float16", "float32", "uint8"))
    num_threads: int = key(POS_INT)
    prefetch_queue_depth: int = key(POS_INT)
    shuffle_buffer: int = key(POS_INT)
    mean: list = key(FLOAT_LIST)
    std: list = key(FLOAT_LIST)
    baseline_workers: int = key(NONNEG_INT)


@dataclass(frozen=True)
class Model:
    """Read by the model package, so by training and inference alike; ``channels_last`` is the one
    memory-format setting (the pipelines' float layout follows it)."""
    name: str = key(STR)
    drop_rate: float = key(FRACTION)
    channels_last: bool = key(BOOL)
    compile: bool = key(BOOL)
    compile_backend: str = key(STR, default="inductor")
    amp: bool = key(BOOL)
    amp_dtype: str = key(("auto", "bfloat16", "float16"))


@dataclass(frozen=True)
class Train:
    loss: str = key(("per_positive_softmax", "bce"))
    epochs: int = key(POS_INT)
    batch_size: int = key(POS_INT)
    lr: float = key(FLOAT)
    lr_step_epochs: int = key(POS_INT)
    lr_gamma: float = key(FLOAT)
    momentum: float = key(FLOAT)
    nesterov: bool = key(BOOL)
    weight_decay: float = key(FLOAT)
    lr_scaling: str = key(("none", "linear"))
    warmup_epochs: int = key(NONNEG_INT)
    max_steps_per_epoch: int = key(NONNEG_INT)
    log_every: int = key(POS_INT)
    checkpoint_every_steps: int = key(NONNEG_INT)
    seed: int | None = key(OPT_INT)  # None: data.seed (see common.seeds.training_seed)
    machine_label_floor: float = key(SHARE, default=0.5)


@dataclass(frozen=True)
class Tune:
    epochs: int = key(POS_INT)
    lr: float = key(FLOAT)
    holdout_fraction: float = key(FRACTION)
    min_class_examples: int = key(POS_INT)
    unseen_class_threshold: bool = key(BOOL, default=True)
    test_resolutions: list = key(RESOLUTIONS, default=[])


@dataclass(frozen=True)
class Predict:
    """What validation (training) and submissions (inference) share."""
    top_k: int = key(POS_INT)
    tta: str = key(("none", "flip", "tencrop"))
    batch_size: int = key(POS_INT)
    max_labels: int = key(POS_INT)
    ensemble_vote: int = key(NONNEG_INT)


@dataclass(frozen=True)
class Submit:
    threshold: float = key(FLOAT)
    min_labels: int = key(POS_INT)
    max_fallback_fraction: float = key(SHARE)


SECTIONS: dict[str, type] = {"paths": Paths, "data": Data, "pipeline": Pipeline, "model": Model, "train": Train,
                             "tune": Tune, "predict": Predict, "submit": Submit}
SCHEMA: dict[str, dict[str, Any]] = {name: {f.name: f.metadata["kind"] for f in dataclasses.fields(cls)}
                                     for name, cls in SECTIONS.items()}
DEFAULTS: dict[str, Any] = {f"{name}.{f.name}": f.metadata["default"] for name, cls in SECTIONS.items()
                            for f in dataclasses.fields(cls) if f.metadata["default"] is not NO_DEFAULT}


def _layout_to_channels_last(value: Any) -> Any:
    if value not in ("NCHW", "NHWC"):
        raise ConfigError(f"config key 'pipeline.layout' must be one of NCHW, NHWC, got {value!r}")
    return value == "NHWC"


# old dotted key -> (new dotted key, value conversion)
RENAMED: dict[str, tuple[str, Any]] = {
    "pipeline.layout": ("model.channels_last", _layout_to_channels_last),
    "train.amp": ("model.amp", None),
    "validation.top_k": ("predict.top_k", None),
    "submit.top_k": ("predict.top_k", None),
    "submit.tta": ("predict.tta", None),
    "submit.batch_size": ("predict.batch_size", None),
    "submit.max_labels": ("predict.max_labels", None),
}
# keys that no longer do anything: accepted with a one-line warning saying why
DROPPED: dict[str, str] = {
    "data.shard_max_bytes": "shards now hold data.shard_max_samples images each, cut up front so that any number "
                            "of workers writes the same bytes (20,000 of the ~45 KB resized images: about 1 GB)",
}
OLD_SECTIONS = {old.split(".")[0] for old in [*RENAMED, *DROPPED]} - set(SECTIONS)


def _renamed(old: str, value: Any, where: str) -> tuple[str, str, Any]:
    """(section, key, value) under the new name, with a one-line deprecation warning."""
    new, convert = RENAMED[old]
    log.warning("config key '%s' (%s) is now '%s'; the old name still works but will go", old, where, new)
    section, name = new.split(".")
    return section, name, convert(value) if convert else value


def _check(key: str, spec: Any, value: Any, base: Path) -> Any:
    """Return the value converted to its final form, or raise ConfigError naming the key."""
    def bad(expected: str):
        return ConfigError(f"config key '{key}' must be {expected}, got {value!r}")

    if spec in (FLOAT, FRACTION, SHARE) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or isinstance(value, float)
    if isinstance(spec, tuple):
        if value not in spec:
            raise bad("one of " + ", ".join(spec))
        return value
    if spec == PATH:
        if not isinstance(value, (str, Path)) or not str(value):
            raise bad("a path")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p).resolve()
    if spec == ANY_INT:
        if not is_int:
            raise bad("an integer")
    elif spec == OPT_INT:
        if value is not None and not is_int:
            raise bad("an integer, or null")
    elif spec == POS_INT:
        if not is_int or value <= 0:
            raise bad("a positive integer")
    elif spec == NONNEG_INT:
        if not is_int or value < 0:
            raise bad("a non-negative integer")
    elif spec == FLOAT:
        if not is_num:
            raise bad("a number")
        return float(value)
    elif spec == FRACTION:
        if not is_num or not 0 <= value < 1:
            raise bad("a number in [0, 1)")
        return float(value)
    elif spec == SHARE:
        if not is_num or not 0 <= value <= 1:
            raise bad("a number in [0, 1]")
        return float(value)
    elif spec == BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif spec == FLOAT_LIST:
        if not isinstance(value, list) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("a list of numbers")
        return [float(v) for v in value]
    elif spec == RESOLUTIONS:
        if not isinstance(value, list) or not all(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and v > 0 for v in pair) and pair[1] <= pair[0]
                for pair in value):
            raise bad("a list of [short side, crop] pairs of positive integers, each crop at most its short side "
                      "(e.g. [[256, 224], [292, 256]]), or []")
        return [list(pair) for pair in value]
    elif spec == STR:
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
    return value


@dataclass(frozen=True)
class Config:
    """A validated config: ``cfg.paths.shards`` (a resolved Path), ``cfg.train.lr`` ..."""
    paths: Paths
    data: Data
    pipeline: Pipeline
    model: Model
    train: Train
    tune: Tune
    predict: Predict
    submit: Submit
    source: Path | None = None
    overrides: tuple[str, ...] = ()  # the --set values it was loaded with (messages repeat them)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(
            getattr(self, name)).items()} for name in SECTIONS}

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        raw = copy.deepcopy(self.to_dict())
        overrides = tuple(overrides)
        return _build(_validate(_apply_sets(raw, overrides, Path.cwd()), Path.cwd()), self.source,
                      self.overrides + overrides)


def _build(values: dict[str, dict[str, Any]], source: Path | None, overrides: tuple[str, ...] = ()) -> Config:
    return Config(**{name: cls(**values[name]) for name, cls in SECTIONS.items()}, source=source,
                  overrides=overrides)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one file (following ``extends``), turning relative paths absolute on the way."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; it must be a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with reading(path, "a YAML config file"):
            data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"config file {path}{line} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    merged: dict[str, Any] = {}
    if "extends" in data:
        parent = Path(str(data.pop("extends"))).expanduser()
        merged = _read_yaml(parent if parent.is_absolute() else path.parent / parent, seen + (path,))
    mine: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section not in SCHEMA and section not in OLD_SECTIONS:
            raise ConfigError(f"unknown config key '{section}' in {path}")
        if not isinstance(values, dict):
            raise ConfigError(f"config key '{section}' in {path} must be a mapping")
        for name, value in values.items():
            if f"{section}.{name}" in DROPPED:
                log.warning("config key '%s.%s' (%s) is ignored: %s", section, name, path, DROPPED[f"{section}.{name}"])
                continue
            if f"{section}.{name}" in RENAMED:
                new_section, new_name, value = _renamed(f"{section}.{name}", value, str(path))
                if new_name in data.get(new_section, {}) or new_name in mine.get(new_section, {}):
                    raise ConfigError(f"{path} sets both '{section}.{name}' and '{new_section}.{new_name}'; "
                                      f"keep only '{new_section}.{new_name}'")
                section_out, name = new_section, new_name
            elif section not in SCHEMA:
                raise ConfigError(f"unknown config key '{section}.{name}' in {path}")
            else:
                section_out = section
            if SCHEMA.get(section_out, {}).get(name) == PATH and isinstance(value, str):
                p = Path(value).expanduser()
                value = str(p if p.is_absolute() else (path.parent / p).resolve())
            mine.setdefault(section_out, {})[name] = value
    for section, values in mine.items():
        merged.setdefault(section, {}).update(values)
    return merged


def _apply_sets(raw: dict[str, Any], overrides: Iterable[str], base: Path) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        dotted = dotted.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        parts = dotted.split(".")
        if dotted in DROPPED:
            log.warning("config key '%s' (--set) is ignored: %s", dotted, DROPPED[dotted])
            continue
        if dotted in RENAMED:
            section, name, value = _renamed(dotted, value, "--set")
        elif len(parts) == 2 and parts[0] in SCHEMA and parts[1] in SCHEMA[parts[0]]:
            section, name = parts
        else:
            raise ConfigError(f"unknown config key '{dotted}' in --set")
        if SCHEMA[section][name] == PATH:
            value = str((base / Path(text).expanduser()).resolve())
        raw.setdefault(section, {})[name] = value
    return raw


def _validate(raw: dict[str, Any], base: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section, spec in SCHEMA.items():
        given = raw.get(section, {})
        for name in given:
            if name not in spec:
                raise ConfigError(f"unknown config key '{section}.{name}'")
        out[section] = {}
        for name, kind in spec.items():
            if name not in given and f"{section}.{name}" not in DEFAULTS:
                raise ConfigError(f"config key '{section}.{name}' is missing")
            value = given[name] if name in given else DEFAULTS[f"{section}.{name}"]
            out[section][name] = _check(f"{section}.{name}", kind, value, base)
    return out


def load_config(path: str | Path = "config.yaml", overrides: Iterable[str] = ()) -> Config:
    """Read ``path``, apply ``--set`` overrides, validate everything; raise ConfigError on any problem."""
    path, overrides = Path(path), tuple(overrides)
    raw = _apply_sets(_read_yaml(path), overrides, Path.cwd())
    return _build(_validate(raw, path.resolve().parent), path.resolve(), overrides)


def require_file(path: Path, what: str = "required file") -> Path:
    """Raise a one-line ConfigError unless ``path`` is an existing file."""
    if not Path(path).is_file():
        raise ConfigError(f"{what} not found: {path}")
    return Path(path)
