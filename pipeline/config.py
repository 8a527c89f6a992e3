"""One YAML configuration per run, written to RUN/config.yaml. Command-line flags override it.

The sections mirror the rooms: `fit` (the Ray stage and SMPLify overrides), `train` (a trainer
preset plus overrides), `tracking` (MLflow). Unknown keys are errors, so a typo never passes silently.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from fitting.errors import BadInput
from trainer.data import storage
from trainer.data.storage import Location
from trainer.train import TRAIN_PRESETS, TrainConfig


@dataclass
class FitStageConfig:
    batch_size: int = 256          # samples per SMPLify batch inside an actor
    num_actors: int = 0            # 0: one per core (or per GPU)
    cpus_per_actor: float = 0.0    # 0: the machine's cores split over the actors
    gpus_per_actor: float = -1.0   # -1: 1 when the cluster has GPUs, else 0
    solver: str = ""               # "" keeps the SMPLify default; "adam" is SPIN's own solver
    smplify: dict[str, Any] = field(default_factory=dict)  # SmplifyConfig overrides


@dataclass
class TrackingConfig:
    experiment: str = "spin-pipeline"
    tracking_uri: str = ""         # "" : $MLFLOW_TRACKING_URI, else sqlite under the run directory
    overlay_samples: int = 6       # fixed samples whose fits are drawn round over round


@dataclass
class RunConfig:
    data: str = ""                 # samples directory (with train/ and test/ splits)
    body_model: str = ""           # SMPL-layout .npz; "" is the built-in model
    prior: str = ""                # GMM pose prior .npz (gmm_08 layout); "" is the built-in prior
    rounds: int = 3
    seed: int = 0
    train_preset: str = "small"
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides on top of the preset
    evaluate: bool = True          # evaluate every regressor and fits table on the test split
    fit: FitStageConfig = field(default_factory=FitStageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return _build(cls, data, "config")


def _build(kind: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping, found {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value or {}, f"{where}.{name}")
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise BadInput(f"{where}.{name}: expected a mapping")
            values[name] = dict(value)
        else:
            values[name] = _coerce(value, default, f"{where}.{name}")
    return kind(**values)


def _coerce(value: Any, default: Any, where: str) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        return type(default)(value)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where}: cannot read {value!r} as {type(default).__name__}") from exc


def load_config(path: str | Location | None) -> RunConfig:
    """A run YAML from a local path or a URI; None gives the defaults."""
    if path is None:
        return RunConfig()
    path = storage.location(path)
    if not storage.is_file(path):
        raise BadInput(f"config not found: {path}")
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: not valid YAML ({' '.join(str(exc).split())[:160]})") from exc
    return RunConfig.from_dict(data)


def key_value_pairs(texts: tuple[str, ...], option: str, key_name: str = "KEY") -> dict[str, str]:
    """Repeatable `OPTION KEY=VALUE` flags as a dict of strings; each KEY once."""
    out: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key or key in out:
            raise BadInput(f"{option} {text!r}: expected {key_name}=VALUE, each {key_name} once")
        out[key] = value
    return out


def yaml_settings(texts: tuple[str, ...], option: str) -> dict[str, Any]:
    """Repeatable `OPTION KEY=VALUE` flags with YAML values: '64' -> 64, '{keypoints: 5}' -> a dict."""
    out: dict[str, Any] = {}
    for key, value in key_value_pairs(texts, option).items():
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise BadInput(f"{option} {key}={value!r}: not a YAML value ({' '.join(str(exc).split())[:120]})") from exc
    return out


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Dotted keys ('fit.batch_size') with non-None values replace config values."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return RunConfig.from_dict(data)


def save_config(config: RunConfig, path: str | Location) -> None:
    """Write the config as YAML, atomically, to a local path or a URI."""
    storage.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def resolve_config(run: Location, config_path: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Flags > --config FILE > RUN/config.yaml > defaults; the result is written to RUN/config.yaml.
    RUN, the data directory and FILE may be URIs."""
    saved = storage.join(run, "config.yaml")
    if config_path:
        base = load_config(config_path)
    elif storage.exists(saved):
        base = load_config(saved)
    else:
        base = RunConfig()
    config = apply_overrides(base, overrides)
    if config.data and not storage.is_dir(config.data):
        raise BadInput(f"data directory not found: {config.data}")
    save_config(config, saved)
    return config


def train_config_for(config: RunConfig) -> TrainConfig:
    if config.train_preset not in TRAIN_PRESETS:
        raise BadInput(f"unknown train preset '{config.train_preset}'; choose from {sorted(TRAIN_PRESETS)}")
    preset = TRAIN_PRESETS[config.train_preset]
    merged = {**preset, **config.train}
    for group in ("weights", "augment"):  # a run's own loss weight keeps the preset's others
        if isinstance(preset.get(group), dict) and isinstance(config.train.get(group), dict):
            merged[group] = {**preset[group], **config.train[group]}
    merged.setdefault("seed", config.seed)
    return TrainConfig.from_dict(merged)


def data_dir(config: RunConfig, split: str) -> Location:
    if not config.data:
        raise BadInput("no data directory: pass --data DIR or set `data` in the config")
    path = storage.join(config.data, split)
    return path if storage.is_dir(path) else storage.location(config.data)
