"""One YAML configuration per run, written to RUN/config.yaml. Command-line flags override it.

The sections mirror the rooms: `fit` (the Ray stage and SMPLify overrides), `train` (a trainer
preset plus overrides), `tracking` (MLflow). The whole configuration is read when it is loaded:
`fit.smplify` (with `fit.solver`) as `RunConfig.smplify`, `train_preset` and `train` as
`RunConfig.training`. So a typo or a bad value stops a command before any work, and RUN/config.yaml
keeps only what the run sets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fitting.body_model import BodyModel, builtin_body_model_path, load_body_model
from fitting.errors import BadInput
from fitting.identity import file_identity
from fitting.priors import GMMPrior, builtin_prior_path, load_prior
from fitting.settings import Settings, read_yaml
from fitting.smplify import SmplifyConfig
from fitting.solvers import SOLVERS
from trainer.data import storage
from trainer.data.storage import Location
from trainer.train_config import TrainConfig, train_config


FIT_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class FitStageConfig(Settings):
    SECTION = "config.fit"

    batch_size: int = 256          # samples per SMPLify batch inside an actor
    num_actors: int = 0            # 0: one per core, or as many as the GPUs hold at gpus_per_actor
    cpus_per_actor: float = 0.0    # 0: the machine's cores split over the actors
    # GPUs per actor: -1 is 1 when the cluster has GPUs, else 0; a fraction shares a GPU between
    # actors (0.25: four per GPU); more than 1 must be a whole number (Ray's rule)
    gpus_per_actor: float = -1.0
    # where actors fit: 'auto' on GPUs when the cluster has them (or gpus_per_actor asks for them),
    # 'cuda' on GPUs or not at all, 'cpu' never on a GPU
    device: str = "auto"
    solver: str = ""               # "" keeps the SMPLify default; "adam" is SPIN's own solver
    smplify: dict[str, Any] = field(default_factory=dict)  # SmplifyConfig overrides

    def __post_init__(self) -> None:
        if self.solver and self.solver not in SOLVERS:
            raise BadInput(f"unknown solver '{self.solver}' (known: {', '.join(sorted(SOLVERS))})")
        if self.device not in FIT_DEVICES:
            raise BadInput(f"device must be one of {', '.join(FIT_DEVICES)}, got {self.device!r}")
        for name, least in (("batch_size", 1), ("num_actors", 0), ("cpus_per_actor", 0)):
            if not getattr(self, name) >= least:  # `not >=`: NaN fails too
                raise BadInput(f"{name} must be >= {least}, got {getattr(self, name)!r}")
        share = self.gpus_per_actor
        if not (share == -1 or (math.isfinite(share) and share >= 0 and (share <= 1 or float(share).is_integer()))):
            raise BadInput(f"gpus_per_actor must be -1 (auto), a fraction in [0, 1] or a whole number, got {share!r}")
        if self.device == "cpu" and share > 0:
            raise BadInput(f"device 'cpu' with gpus_per_actor {share}: an actor that holds a GPU fits on it")
        if self.device == "cuda" and share == 0:
            raise BadInput("device 'cuda' with gpus_per_actor 0: an actor that fits on a GPU must hold one")


@dataclass
class TrackingConfig(Settings):
    SECTION = "config.tracking"

    experiment: str = "spin-pipeline"
    tracking_uri: str = ""         # "" : $MLFLOW_TRACKING_URI, else sqlite under the run directory
    overlay_samples: int = 6       # fixed samples whose fits are drawn round over round


@dataclass
class RunConfig(Settings):
    SECTION = "config"

    data: str = ""                 # data root (train/ and test/ splits, one or many datasets)
    mix: dict[str, float] = field(default_factory=dict)  # dataset (or "a,b": split by size) -> sampling weight
    body_model: str = ""           # SMPL-layout .npz; "" is the built-in model
    prior: str = ""                # GMM pose prior .npz (gmm_08 layout); "" is the built-in prior
    init_from: str = ""            # regressor 0's start: "" (backbone_weights), spin:FILE, or a checkpoint
    body_model_male: str = ""      # SMPL_MALE / SMPL_FEMALE as .npz: 3DPW's truth meshes (SPIN's);
    body_model_female: str = ""    # "" scores 3DPW against the neutral model, and says so
    rounds: int = 3
    seed: int = 0
    train_preset: str = "small"
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides on top of the preset
    evaluate: bool = True          # evaluate every regressor and fits table on the test split
    fit: FitStageConfig = field(default_factory=FitStageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise BadInput(f"rounds is {self.rounds}; a run has at least 1 round")
        # read the sections that other rooms own now: a bad setting fails before any work
        _ = self.smplify, self.training
        for key, command in (("prior", "prior"), ("body_model", "body-model")):
            path = getattr(self, key)
            if path.lower().endswith(".pkl"):
                target = path[:-4] + ".npz"
                raise BadInput(f"{key}: {path} is a pickle, which a run never loads; convert it once with "
                               f"`spin-pipeline {command} convert --allow-pickle {path} {target}` and set {key}: {target}")
        for key, weight in self.mix.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise BadInput(f"mix.{key}: a sampling weight must be a number >= 0, got {weight}")

    @property
    def smplify(self) -> SmplifyConfig:
        """SMPLify's settings: the defaults, `fit.smplify` over them, every stage on `fit.solver`."""
        return SmplifyConfig.from_dict(self.fit.smplify, "config.fit.smplify").with_solver(self.fit.solver)

    @property
    def training(self) -> TrainConfig:
        """The trainer's settings: `train` over the preset's, seeded by the run unless it sets a seed."""
        return train_config(self.train_preset, self.train, seed=self.seed, where="config.train")


GENDERS = ("male", "female")


def run_models(config: RunConfig) -> dict[str, dict[str, str]]:
    """The run's body model and pose prior (and its male and female models, when set): path and
    sha256 of each file. Every step takes them at its start, loads only those contents and records
    them, so a step can never use another model than the configured one."""
    models = {"body_model": file_identity(config.body_model or builtin_body_model_path(), "body model"),
              "prior": file_identity(config.prior or builtin_prior_path(), "pose prior")}
    for gender in GENDERS:
        path = getattr(config, f"body_model_{gender}")
        if path:
            models[f"body_model_{gender}"] = file_identity(path, f"{gender} body model")
    return models


def run_params(config: RunConfig) -> dict[str, Any]:
    """What a run logs as its MLflow parameters: the configuration and the models it pins."""
    return {**config.to_dict(), "models": run_models(config)}


def load_run_body_model(models: dict[str, dict[str, str]], device: str | torch.device = "cpu",
                        key: str = "body_model") -> BodyModel:
    """The run's body model (`key`: or its male / female one), exactly the content `run_models` pinned."""
    return load_body_model(models[key]["path"], device, sha256=models[key]["sha256"])


def load_run_prior(models: dict[str, dict[str, str]], device: str | torch.device = "cpu") -> GMMPrior:
    """The run's pose prior, exactly the content `run_models` pinned."""
    return load_prior(models["prior"]["path"], device=device, sha256=models["prior"]["sha256"])


def check_run_models(models: dict[str, dict[str, str]]) -> None:
    """Load the run's body models and prior once, so that an invalid one is one line before any
    worker starts (each worker loads its own)."""
    for key in models:
        if key.startswith("body_model"):
            load_run_body_model(models, key=key)
    load_run_prior(models)


def load_config(path: str | Location | None) -> RunConfig:
    """A run YAML from a local path or a URI; None gives the defaults."""
    if path is None:
        return RunConfig()
    path = storage.location(path)
    if not storage.is_file(path):
        raise BadInput(f"config not found: {path}")
    return RunConfig.from_dict(read_yaml(storage.read_text(path), str(path)) or {})


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
        out[key] = read_yaml(value, f"{option} {key}={value!r}")
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


def save_run_config(run: Location, config: RunConfig) -> None:
    """RUN/config.yaml: called by a step that succeeded, just before it marks itself done."""
    save_config(config, storage.join(run, "config.yaml"))


def resolve_config(run: Location, config_path: str | None, overrides: dict[str, Any], force: bool = False) -> RunConfig:
    """Flags > --config FILE > RUN/config.yaml > defaults. RUN, the data directory and FILE may be
    URIs. Nothing is written here: a command that fails leaves the run as it was, and a step that
    succeeds records its config (`save_run_config`). Data other than the run's (RUN/config.yaml,
    written by its earlier steps) is refused unless `force`."""
    saved_path = storage.join(run, "config.yaml")
    saved = load_config(saved_path) if storage.exists(saved_path) else None
    base = load_config(config_path) if config_path else saved or RunConfig()
    config = apply_overrides(base, overrides)
    if config.data and not storage.is_dir(config.data):
        raise BadInput(f"data directory not found: {config.data}")
    if saved is not None and saved.data and config.data and not force and not same_place(saved.data, config.data):
        raise BadInput(f"the run {run} fits the data {saved.data}, not {config.data}: "
                       "pass --force to redo this step with the new data")
    start = config.init_from.removeprefix("spin:")
    if start and not storage.exists(start):
        raise BadInput(f"init_from: {start} not found")
    return config


def same_place(a: str, b: str) -> bool:
    """Whether two locations name the same folder (local paths compared resolved)."""
    a, b = storage.location(a), storage.location(b)
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return str(a) == str(b)


def data_dir(config: RunConfig, split: str) -> Location:
    if not config.data:
        raise BadInput("no data directory: pass --data DIR or set `data` in the config")
    path = storage.join(config.data, split)
    return path if storage.is_dir(path) else storage.location(config.data)
