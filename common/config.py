"""Load, validate and override the project's YAML config.

The schema below lists every key with its type; values live only in YAML files
(``config.yaml`` at the repository root holds the original solution's values).
A config file may start with ``extends: other.yaml`` to take every value from
another file and change a few. Relative paths are resolved against the folder of
the file that sets them (or the current directory for ``--set``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from common.errors import UserError


class ConfigError(UserError):
    pass


PATH = "path"
ANY_INT = "int"
POS_INT = "positive int"
NONNEG_INT = "non-negative int"
FLOAT = "number"
FRACTION = "number in [0, 1)"
BOOL = "bool"
FLOAT_LIST = "list of numbers"


def choice(*options: str) -> tuple[str, ...]:
    return tuple(options)


SCHEMA: dict[str, dict[str, Any]] = {
    "paths": {k: PATH for k in ("original_images", "competition_data", "shards", "artifacts", "output")},
    "data": {
        "shortest_side": POS_INT,
        "jpeg_quality": POS_INT,
        "val_fraction": FRACTION,
        "seed": ANY_INT,
        "shard_max_samples": POS_INT,
        "shard_max_bytes": POS_INT,
        "reduced_decode": BOOL,
    },
    "pipeline": {
        "device": choice("auto", "gpu", "cpu"),
        "crop_size": POS_INT,
        "augmentation": choice("crop_flip", "random_resized_crop"),
        "dtype": choice("auto", "float16", "float32", "uint8"),
        "layout": choice("NCHW", "NHWC"),
        "num_threads": POS_INT,
        "prefetch_queue_depth": POS_INT,
        "shuffle_buffer": POS_INT,
        "mean": FLOAT_LIST,
        "std": FLOAT_LIST,
        "baseline_workers": NONNEG_INT,
    },
    "model": {"name": "str", "drop_rate": FRACTION, "channels_last": BOOL, "compile": BOOL},
    "train": {
        "loss": choice("per_positive_softmax", "bce"),
        "epochs": POS_INT,
        "batch_size": POS_INT,
        "lr": FLOAT,
        "lr_step_epochs": POS_INT,
        "lr_gamma": FLOAT,
        "momentum": FLOAT,
        "nesterov": BOOL,
        "weight_decay": FLOAT,
        "amp": BOOL,
        "max_steps_per_epoch": NONNEG_INT,
        "log_every": POS_INT,
    },
    "tune": {"epochs": POS_INT, "lr": FLOAT, "holdout_fraction": FRACTION, "min_class_examples": POS_INT},
    "validation": {"top_k": POS_INT},
    "submit": {
        "top_k": POS_INT,
        "threshold": FLOAT,
        "max_labels": POS_INT,
        "min_labels": POS_INT,
        "tta": choice("none", "flip", "tencrop"),
        "batch_size": POS_INT,
    },
}


def _check(key: str, spec: Any, value: Any, base: Path) -> Any:
    """Return the value converted to its final form, or raise ConfigError naming the key."""
    def bad(expected: str):
        return ConfigError(f"config key '{key}' must be {expected}, got {value!r}")

    if spec in (FLOAT, FRACTION) and isinstance(value, str):
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
        if not isinstance(value, str) or not value:
            raise bad("a path")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p).resolve()
    if spec == ANY_INT:
        if not is_int:
            raise bad("an integer")
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
    elif spec == BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif spec == FLOAT_LIST:
        if not isinstance(value, list) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("a list of numbers")
        return [float(v) for v in value]
    elif spec == "str":
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
    return value


class Section:
    """Attribute access over one validated section (``cfg.data.seed``)."""

    def __init__(self, name: str, values: dict[str, Any]):
        self._name = name
        self.__dict__.update(values)

    def __getattr__(self, item):  # only called for missing attributes
        raise AttributeError(f"config has no key '{self._name}.{item}'")

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k != "_name"}


class Config:
    """A validated config: ``cfg.paths.shards`` (a resolved Path), ``cfg.train.lr`` ..."""

    def __init__(self, values: dict[str, dict[str, Any]], source: Path | None):
        self.source = source
        for name, section in values.items():
            setattr(self, name, Section(name, section))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in SCHEMA}

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        raw = copy.deepcopy(self.to_dict())
        return Config(_validate(_apply_sets(raw, overrides, Path.cwd()), Path.cwd()), self.source)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one file (following ``extends``), turning relative paths absolute on the way."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
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
    for section, values in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown config key '{section}' in {path}")
        if not isinstance(values, dict):
            raise ConfigError(f"config key '{section}' in {path} must be a mapping")
        target = merged.setdefault(section, {})
        for key, value in values.items():
            if SCHEMA[section].get(key) == PATH and isinstance(value, str):
                p = Path(value).expanduser()
                value = str(p if p.is_absolute() else (path.parent / p).resolve())
            target[key] = value
    return merged


def _apply_sets(raw: dict[str, Any], overrides: Iterable[str], base: Path) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in SCHEMA or parts[1] not in SCHEMA[parts[0]]:
            raise ConfigError(f"unknown config key '{key.strip()}' in --set")
        try:
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        if SCHEMA[parts[0]][parts[1]] == PATH:
            value = str((base / Path(text).expanduser()).resolve())
        raw.setdefault(parts[0], {})[parts[1]] = value
    return raw


def _validate(raw: dict[str, Any], base: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section, spec in SCHEMA.items():
        given = raw.get(section, {})
        for key in given:
            if key not in spec:
                raise ConfigError(f"unknown config key '{section}.{key}'")
        out[section] = {}
        for key, kind in spec.items():
            if key not in given:
                raise ConfigError(f"config key '{section}.{key}' is missing")
            out[section][key] = _check(f"{section}.{key}", kind, given[key], base)
    return out


def load_config(path: str | Path = "config.yaml", overrides: Iterable[str] = ()) -> Config:
    """Read ``path``, apply ``--set`` overrides, validate everything; raise ConfigError on any problem."""
    path = Path(path)
    raw = _apply_sets(_read_yaml(path), overrides, Path.cwd())
    return Config(_validate(raw, path.resolve().parent), path.resolve())


def require_file(path: Path, what: str = "required file") -> Path:
    """Raise a one-line ConfigError unless ``path`` is an existing file."""
    if not Path(path).is_file():
        raise ConfigError(f"{what} not found: {path}")
    return Path(path)
