"""Training the regressor on a best-fit table (SPIN's supervision) or on 2D keypoints alone.

`train_regressor` writes OUT/checkpoint.pt (atomically, at the end) and OUT/last.pt every
`checkpoint_every` steps; a rerun with the same configuration resumes from last.pt and ends with
the same weights as an uninterrupted run (batches and augmentation depend only on the seed and
the step; the torch RNG state travels in last.pt). Checkpoints hold only tensors and plain
values, so they load with torch.load(weights_only=True); the regressor's configuration is inside.

A keypoints regressor trains on `KeypointBatches` (no image is decoded, no loader worker runs);
an image regressor through the DataLoader. Both take the same steps, losses and checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from fitting.body_model import BodyModel
from fitting.errors import BadInput
from fitting.priors import GMMPrior
from trainer.data.storage import atomic_local
from trainer.data.tables import QUARANTINE_SCHEMA, SAMPLES_SCHEMA, concat, conform, to_numpy, write_table
from trainer.dataset import (
    KeypointBatches,
    MixedBatchSampler,
    SamplesDataset,
    StepBatchSampler,
    lacks_images,
    make_loader,
    mixing_probabilities,
    read_samples,
)
from trainer.losses import LossResult, compute_losses, loss_body
from trainer.mean_params import load_mean_params
from trainer.model import (
    Regressor,
    axis_angle_pose,
    cam_translation,
    load_spin_weights,
    model_input,
    weights_record,
)
from trainer.train_config import TrainConfig

CHECKPOINT_FORMAT = "spin-pipeline-regressor/1"
# settings that may change between a run and its resumption (how the step runs, not what it computes)
_RESUMABLE = frozenset({"steps", "num_workers", "device", "log_every", "checkpoint_every", "threads", "compile"})


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BadInput(f"unknown device '{name}'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():  # never a silent fall back to the CPU
        raise BadInput(f"device '{name}': no CUDA device is visible to torch (use --device cpu or auto)")
    return device


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file and a rename: never a half-written checkpoint."""
    with atomic_local(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=resolve_device(device), weights_only=True)
    except Exception as exc:  # unpickling and zip errors come in many types
        raise BadInput(f"{path}: not a readable checkpoint ({' '.join(str(exc).split())[:160]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise BadInput(f"{path}: not a spin-pipeline regressor checkpoint")
    return payload


def _zero_mean_params() -> dict[str, np.ndarray]:
    # placeholders: the real values are buffers in the state dict
    return {"pose": np.zeros(144, np.float32), "shape": np.zeros(10, np.float32), "cam": np.zeros(3, np.float32)}


def regressor_from_payload(payload: dict[str, Any], source: str = "checkpoint") -> Regressor:
    regressor = Regressor(**payload["regressor"], mean_params=_zero_mean_params(), backbone_weights="none")
    try:
        regressor.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise BadInput(f"{source}: weights do not match the regressor ({' '.join(str(exc).split())[:160]})") from exc
    return regressor


def load_regressor(path: str | Path, device: str | torch.device = "cpu") -> Regressor:
    """A trained regressor, in eval mode on `device` (torch.load with weights_only=True)."""
    device = resolve_device(device)
    return regressor_from_payload(read_checkpoint(path, device), str(path)).to(device).eval()


def _payload(regressor: Regressor, config: TrainConfig, step: int, **extra: Any) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "regressor": dict(regressor.config), "train_config": config.to_dict(),
            "model": regressor.state_dict(), "step": int(step), **extra}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RESUMABLE}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


SPIN_PREFIX = "spin:"


def parse_init(init_from: str | Path | None) -> tuple[str, Path | None]:
    """('fresh' | 'spin' | 'checkpoint', path) from a start: None, 'spin:PATH' (SPIN's released
    checkpoint) or the path of one of this project's checkpoints."""
    if init_from in (None, ""):
        return "fresh", None
    text = str(init_from)
    if text.startswith(SPIN_PREFIX):
        return "spin", Path(text[len(SPIN_PREFIX):])
    return "checkpoint", Path(text)


def _build_regressor(config: TrainConfig, init_from: str | Path | None) -> tuple[Regressor, dict[str, str]]:
    """The regressor to train and the record of the weights its backbone started from (carried
    along warm starts, so the last round still names the ImageNet or SPIN file)."""
    kind, path = parse_init(init_from)
    shape = {"hidden": config.head_hidden, "dropout": config.head_dropout, "encoder_width": config.encoder_width}
    if kind == "fresh":
        regressor = Regressor(config.backbone, config.img_res, mean_params=load_mean_params(config.mean_params),
                              backbone_weights=config.backbone_weights, **shape)
        return regressor, regressor.backbone_weights
    if kind == "spin":
        # every weight comes from SPIN's file, its mean parameters included: the ImageNet file is not needed
        regressor = Regressor(config.backbone, config.img_res, mean_params=_zero_mean_params(), backbone_weights="none",
                              **shape)
        load_spin_weights(regressor, path)
        return regressor, weights_record(path, "spin")
    payload = read_checkpoint(path)
    if payload["regressor"].get("backbone") != config.backbone:
        raise BadInput(f"{path}: a {payload['regressor'].get('backbone')} regressor cannot warm-start "
                       f"a {config.backbone} one")
    regressor = regressor_from_payload(payload, str(path))
    regressor.img_res = regressor.config["img_res"] = config.img_res  # the network is resolution-independent
    return regressor, payload.get("backbone_weights", weights_record(None, "random"))


class _Meter:
    """Running means of the per-step values: a logging window and the current epoch."""

    def __init__(self) -> None:
        self.window: dict[str, list[float]] = {}
        self.epoch: dict[str, list[float]] = {}

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.window.setdefault(name, []).append(value)
            self.epoch.setdefault(name, []).append(value)

    @staticmethod
    def means(values: dict[str, list[float]], prefix: str) -> dict[str, float]:
        return {f"{prefix}{k}": float(np.mean(v)) for k, v in values.items()}


def learning_rate(config: TrainConfig, step: int) -> float:
    """The rate of step `step` (0-based) of a run of config.steps: constant, or cosine to 0."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))
    return config.lr


def autocast(config: TrainConfig, device: torch.device):
    """The network's forward under bfloat16 autocast when configured, else nothing."""
    if config.autocast == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_losses(regressor: Regressor, batch: dict[str, torch.Tensor], body_model: torch.nn.Module,
                config: TrainConfig, prior: torch.nn.Module | None) -> LossResult:
    """The network's output for a batch and SPIN's losses on it: what a train step differentiates
    (and what `config.compile` compiles)."""
    with autocast(config, next(regressor.parameters()).device):
        out = regressor(model_input(regressor, batch))
    return compute_losses(out, batch, body_model, config.weights, config.mode, prior)


def check_compile(config: TrainConfig, device: torch.device) -> None:
    """BadInput where `config.compile` cannot work here: on a CPU, torch.compile builds C++."""
    if not config.compile or device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - torch reports a missing compiler in several ways
        raise BadInput(f"train.compile needs a C++ compiler on a CPU (g++ or clang++ on PATH, or $CXX): {exc}; "
                       "or set train.compile: false") from exc


def step_loss_function(config: TrainConfig) -> Callable[..., LossResult]:
    """`step_losses`, compiled where the config says so (one graph per batch shape)."""
    return torch.compile(step_losses, dynamic=False) if config.compile else step_losses


def train_step(regressor: Regressor, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               body_model: torch.nn.Module, config: TrainConfig, prior: torch.nn.Module | None, step: int,
               losses: Callable[..., LossResult] = step_losses) -> dict[str, float]:
    """One optimizer step; returns the total, each term's batch value and the gradient norm
    (before clipping). `losses`: `step_losses` or its compiled form (`step_loss_function`)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    result = losses(regressor, batch, body_model, config, prior)
    if not torch.isfinite(result.total):
        raise BadInput(f"training diverged at step {step} (loss {float(result.total.detach())}); try a lower lr")
    optimizer.zero_grad(set_to_none=True)
    result.total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(regressor.parameters(), config.grad_clip or float("inf"), foreach=True)
    optimizer.step()
    return {"loss": float(result.total.detach()), **result.batch_values(), "grad_norm": float(grad_norm)}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _resume(last: Path, config: TrainConfig, mix: dict[str, float], regressor: Regressor,
            optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, set[int]]:
    """Load last.pt into the regressor, the optimizer and the RNG; returns its step and the rows
    whose images could not be read so far."""
    state = read_checkpoint(last, device)
    if _comparable(state["train_config"]) != _comparable(config.to_dict()) or state.get("mix", {}) != mix:
        raise BadInput(f"{last} belongs to a run with other settings; remove it or train into another folder")
    regressor.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["step"]), set(state.get("unreadable", []))


def train_regressor(
    config: TrainConfig | dict[str, Any],
    samples_dirs: list[Path],
    fits: pa.Table | None,
    out_dir: Path,
    body_model: BodyModel,
    init_from: str | Path | None = None,
    prior: GMMPrior | None = None,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    mix: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Train for `config.steps` steps; see the module docstring. The body model (and, in the 2D
    mode, the pose prior) are the caller's: a run passes its configured ones, never a default.

    init_from: None (the backbone's configured weights), a checkpoint of this project to
    warm-start from, or 'spin:PATH', SPIN's released checkpoint. mix: sampling weights per
    dataset (`trainer.dataset.mixing_probabilities`); None or empty draws every row alike.
    log_metrics(metrics, step) gets train/<term> means every `log_every` steps (and at the end)
    and epoch/<term> means when an epoch ends. Returns a summary: steps, seconds, images_per_s,
    final_losses (the last logging window), sample counts and draws per dataset, the weights the
    backbone started from (file and SHA-256), device, and the body model and prior it used
    (`loaded`: path and sha256 of each)."""
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if config.mode == "fits" and fits is None:
        raise BadInput("training mode 'fits' needs a fits table (or use mode '2d')")
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    check_compile(config, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    samples = read_samples(samples_dirs)
    if config.backbone != "keypoints" and lacks_images(samples).any():
        raise BadInput(f"{int(lacks_images(samples).sum())} of {len(samples)} training samples have no image (keypoint-only "
                       f"rows): a {config.backbone} backbone reads pixels; train them with backbone: keypoints")
    augment = config.augment if config.use_augmentation else None
    dataset = SamplesDataset(samples, fits if config.mode == "fits" else None, config.img_res, augment=augment,
                             seed=config.seed)
    if config.mode == "2d" and prior is None:
        raise BadInput("the 2D-only mode needs the run's pose prior")
    body_identity = body_model.identity
    body_model = loss_body(body_model.to(device), config.weights)
    prior = prior.to(device) if prior is not None and config.mode == "2d" else None

    regressor, started_from = _build_regressor(config, init_from)
    regressor = regressor.to(device)
    optimizer = torch.optim.Adam(regressor.parameters(), lr=config.lr, fused=True)
    losses = step_loss_function(config)
    last = out_dir / "last.pt"
    mix = dict(mix or {})
    start, unreadable = _resume(last, config, mix, regressor, optimizer, device) if last.is_file() else (0, set())

    names, counts = np.unique(dataset.datasets, return_counts=True)
    probabilities = mixing_probabilities(dict(zip(names.tolist(), counts.tolist())), mix)
    if mix:
        rows = {name: np.flatnonzero(dataset.datasets == name) for name in names.tolist()}
        sampler = MixedBatchSampler(rows, probabilities, config.batch_size, config.seed, start, config.steps)
    else:
        sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start, config.steps)
    if regressor.eats == "keypoints":
        keypoint_batches = KeypointBatches(dataset, augment, config.seed, compile=config.compile)
        loader = (keypoint_batches.batch(keys, s) for s, keys in enumerate(sampler, start=start))
    else:
        loader = make_loader(dataset, sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda")
    drawn = np.zeros(len(dataset), np.int64)
    regressor.train()
    meter = _Meter()
    images, started, step = 0, time.perf_counter(), start
    # a bar on a terminal only (disable=None): logs and pipes get the summary instead
    with tqdm(total=config.steps, initial=start, disable=None, desc="train", unit="step", leave=False) as bar:
        for batch in loader:
            values = train_step(regressor, optimizer, _to_device(batch, device), body_model, config, prior, step,
                                losses)
            unreadable.update(batch["row"][~batch["usable"]].tolist())
            np.add.at(drawn, batch["row"].numpy(), 1)
            step += 1
            images += len(batch["row"])
            meter.add(values)
            bar.update(1)
            bar.set_postfix_str(f"loss {values['loss']:.4g}, {images / max(time.perf_counter() - started, 1e-9):.1f} samples/s")
            done = step == config.steps
            if step % config.log_every == 0 or done:
                if log_metrics:
                    rate = images / max(time.perf_counter() - started, 1e-9)
                    log_metrics({**meter.means(meter.window, "train/"), "train/images_per_s": rate}, step)
                if not done:
                    meter.window = {}
            if sampler.epoch_of(step) != sampler.epoch_of(step - 1) or done:
                if log_metrics:
                    log_metrics({**meter.means(meter.epoch, "epoch/"), "epoch": float(sampler.epoch_of(step - 1))}, step)
                meter.epoch = {}
            if step % config.checkpoint_every == 0 and not done:
                save_checkpoint(_payload(regressor, config, step, optimizer=optimizer.state_dict(), rng=_rng_state(),
                                         mix=mix, backbone_weights=started_from, unreadable=sorted(unreadable)), last)
    seconds = time.perf_counter() - started
    identity = getattr(body_model, "identity", None) or body_identity
    quarantine = quarantine_table(dataset, unreadable, out_dir)
    summary = {
        "steps": step, "trained_steps": step - start, "resumed_from": start or None,
        "seconds": round(seconds, 3), "images_per_s": images / seconds if seconds > 0 else 0.0,
        "final_losses": {k: float(np.mean(v)) for k, v in meter.window.items()},
        "input": regressor.eats, "loss_body": type(body_model).__name__, "compile": config.compile,
        "samples": len(dataset), "quarantined": len(quarantine),
        "quarantine_reasons": dict(Counter(quarantine.column("reason").to_pylist())),
        "fitted_samples": int(dataset.targets["fit_valid"].sum()),
        "backbone": config.backbone, "backbone_weights": started_from,
        "init_from": str(init_from) if init_from else None, "device": str(device), "mode": config.mode,
        "datasets": {name: {"samples": int(n), "probability": round(probabilities[name], 6),
                            "drawn": int(drawn[dataset.datasets == name].sum())}
                     for name, n in zip(names.tolist(), counts.tolist())},
        "mix": mix,
        "loaded": {"body_model": identity, **({"prior": prior.identity} if prior is not None else {})},
    }
    save_checkpoint(_payload(regressor.cpu(), config, step, summary=summary, backbone_weights=started_from),
                    out_dir / "checkpoint.pt")
    if last.exists():
        last.unlink()
    return summary


def quarantine_table(dataset: SamplesDataset, unreadable: set[int], out_dir: Path) -> pa.Table:
    """The samples that did not train, with their reasons: invalid rows, and rows whose image could
    not be read when a batch needed it. Written to OUT/quarantine.parquet when there are any."""
    tables = [t for t in (dataset.quarantine, dataset.unreadable(unreadable, "train")) if t is not None]
    quarantine = concat(tables, QUARANTINE_SCHEMA)
    path = out_dir / "quarantine.parquet"
    if len(quarantine):
        write_table(quarantine, path)
    elif path.exists():  # an earlier training's
        path.unlink()
    return quarantine


@torch.inference_mode()
def predict(regressor: Regressor, table: pa.Table, batch_size: int = 64, device: str | torch.device = "cpu",
            num_workers: int = 0) -> dict[str, np.ndarray]:
    """The regressor on every row of a samples table, in order, without augmentation.

    Returns pose (N, 72) axis-angle, betas (N, 10), cam_t (N, 3) (SPIN's 5000 px / 224 px camera,
    the SMPLify initialization), cam (N, 3) weak perspective, and ok (N,): False where the image
    could not be read (those rows are predicted from a black image); for a keypoints regressor,
    False where the row has no keypoint at all (its prediction is the network's guess from nothing)."""
    device = resolve_device(device)
    regressor = regressor.to(device).eval()
    if len(table) == 0:
        return {"pose": np.zeros((0, 72), np.float32), "betas": np.zeros((0, 10), np.float32),
                "cam_t": np.zeros((0, 3), np.float32), "cam": np.zeros((0, 3), np.float32), "ok": np.zeros(0, bool)}
    parts: dict[str, list[np.ndarray]] = {"pose": [], "betas": [], "cam_t": [], "cam": [], "ok": []}
    for batch in _prediction_batches(regressor, conform(table, SAMPLES_SCHEMA), batch_size, num_workers):
        out = regressor(model_input(regressor, {k: v.to(device) for k, v in batch.items()}))
        parts["pose"].append(axis_angle_pose(out.rotmat).cpu().numpy())
        parts["betas"].append(out.betas.cpu().numpy())
        parts["cam_t"].append(cam_translation(out.cam).cpu().numpy())
        parts["cam"].append(out.cam.cpu().numpy())
        parts["ok"].append(batch["usable"].cpu().numpy())
    return {k: np.concatenate(v).astype(np.float32 if k != "ok" else bool) for k, v in parts.items()}


def _prediction_batches(regressor: Regressor, table: pa.Table, batch_size: int, num_workers: int):
    """Batches of a samples table in order, holding what the regressor reads and 'usable': the
    keypoints straight from the table (no image is decoded), or the images through the loader."""
    if regressor.eats == "keypoints":
        keypoints = torch.from_numpy(np.nan_to_num(to_numpy(table, "keypoints")).astype(np.float32))
        for start in range(0, len(keypoints), batch_size):
            part = keypoints[start:start + batch_size]
            yield {"keypoints": part, "usable": (part[..., 2] > 0).any(dim=1)}
        return
    dataset = SamplesDataset(table, None, regressor.img_res, augment=None, drop_invalid=False)
    yield from ({"image": b["image"], "usable": b["usable"]}
                for b in make_loader(dataset, batch_size=batch_size, num_workers=num_workers))
