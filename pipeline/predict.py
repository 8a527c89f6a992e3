"""`spin-pipeline predict`: a run's regressor on new images or on a samples folder, optionally
refined by SMPLify from its prediction (SPIN's demo, batched).

Images go through the same crop as ingested data: one crop per OpenPose person when a keypoints
folder is given (SPIN demo's box from the keypoints), else one crop of the whole image (SPIN demo's
box without a detection). The output folder holds

    DIR/predictions.parquet    the fits table's schema, one row per person (docs/fits.md)
    DIR/samples.parquet        the crops it was computed on (imgname, center, scale, keypoints)
    DIR/_quarantine.parquet    inputs that gave no crop, with the reason
    DIR/overlays/<id>.png      the crop with its keypoints, beside the mesh over it
    DIR/_SUCCESS.json          written last: counts, round, checkpoint, refine, device, seconds
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np
import pyarrow as pa
import torch

from fitting.body_model import BodyModel, load_body_model
from fitting.camera import IMG_RES, crop_camera, normalized_to_pixels
from fitting.errors import BadInput
from fitting.priors import load_prior
from fitting.render import draw_keypoints, overlay_mesh
from fitting.smplify import FitInit, SmplifyConfig, fit, score
from pipeline import rundir
from pipeline.config import load_config
from trainer.data import storage
from trainer.data.ingest import Converter, Roots
from trainer.data.samples import decode_image, from_normalized
from trainer.data.tables import (
    QUARANTINE_SCHEMA,
    SAMPLES_SCHEMA,
    concat,
    fits_table,
    read_split,
    shard_paths,
    to_numpy,
    write_table,
)
from trainer.data.wild import OPENPOSE_MIN_CONFIDENCE, image_files, openpose_rows, whole_image_rows
from trainer.train import load_regressor, predict, resolve_device


def latest_round(run: storage.Location) -> int:
    rounds = rundir.finished_rounds(run, "model")
    if not rounds:
        raise BadInput(f"{run} has no trained regressor (no round=N/model/_SUCCESS.json)")
    return rounds[-1]


def _is_samples_folder(path: Path) -> bool:
    try:
        return bool(shard_paths(path, "train" if (path / "train").is_dir() else None))
    except BadInput:
        return False


def read_inputs(source: str | Path, keypoints_dir: str | Path | None, img_size: int, min_confidence: float,
                workers: int = 4) -> tuple[pa.Table, pa.Table, str]:
    """(samples, quarantine, kind) of what to predict on: a samples folder or data root (every
    shard of its train/ and test/ splits), a folder of images (with OpenPose keypoints, one crop
    per person), or one image file."""
    source = Path(source)
    if not source.exists():
        raise BadInput(f"input not found: {source}")
    if source.is_dir() and _is_samples_folder(source):
        if keypoints_dir:
            raise BadInput("--keypoints is for a folder of images; a samples folder carries its keypoints")
        splits = [s for s in ("train", "test") if (source / s).is_dir()] or [None]
        samples = concat([read_split(source, split) for split in splits], SAMPLES_SCHEMA)
        return samples, QUARANTINE_SCHEMA.empty_table(), "samples"
    images_dir = source if source.is_dir() else source.parent
    if keypoints_dir:
        rows = openpose_rows(images_dir, keypoints_dir, min_confidence=min_confidence)
        if not source.is_dir():
            keep = rows.arrays["imgname"] == source.name
            rows = type(rows)({k: v[keep] for k, v in rows.arrays.items()}, [r for r, k in zip(rows.reasons, keep) if k])
    else:
        images = image_files(source) if source.is_dir() else [source]
        if not images:
            raise BadInput(f"no images in {source}")
        rows = whole_image_rows(images)
    converter = Converter(rows, Roots(images_dir, images_dir), "predict", "", img_size)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # min_visible 0: a bare image has no keypoints and is still a prediction
        samples, quarantine = converter.table(range(converter.n), pool, "test", min_visible=0)
    return samples, quarantine, "openpose" if keypoints_dir else "images"


def refine_or_score(body: BodyModel, prior, keypoints: np.ndarray, pred: dict[str, np.ndarray], refine: bool,
                    config: SmplifyConfig, batch_size: int) -> dict[str, np.ndarray]:
    """Fits-table columns of the predictions: SMPLify from each prediction (refine), or the
    prediction as it is, scored under the keypoints. A sample without keypoints has no loss
    (NaN) and is never valid; with refine it keeps the prediction."""
    device = next(body.buffers()).device
    kp_px = normalized_to_pixels(torch.tensor(keypoints), IMG_RES)  # SPIN's 224-px crop frame
    has_keypoints = (keypoints[:, :, 2] > 0).any(axis=1)
    out = {"pose": pred["pose"].copy(), "betas": pred["betas"].copy(), "cam_t": pred["cam_t"].copy(),
           "loss": np.full(len(keypoints), np.nan, np.float32),
           "joint_loss": np.full(keypoints.shape[:2], np.nan, np.float32),
           "iterations": np.zeros(len(keypoints), np.int32)}
    for start in range(0, len(keypoints), batch_size):
        rows = np.arange(start, min(start + batch_size, len(keypoints)))
        rows = rows[has_keypoints[rows]]
        if not len(rows):
            continue
        init = FitInit(*(torch.as_tensor(pred[k][rows], device=device) for k in ("pose", "betas", "cam_t")))
        kp = kp_px[rows].to(device)
        if refine:
            result = fit(body, prior, kp, init, config)
            fitted = np.array([r is None for r in result.reasons])  # an unfittable one keeps its prediction
            keep = rows[fitted]
            for key in ("pose", "betas", "cam_t"):
                out[key][keep] = getattr(result, key).cpu().numpy()[fitted]
            out["iterations"][keep] = result.iterations.cpu().numpy()[fitted]
            loss, joint = score(body, prior, *(torch.as_tensor(out[k][rows], device=device)
                                               for k in ("pose", "betas", "cam_t")), kp, config)
        else:
            loss, joint = score(body, prior, init.pose, init.betas, init.cam_t, kp, config)
        out["loss"][rows], out["joint_loss"][rows] = loss.cpu().numpy(), joint.cpu().numpy()
    return out


def overlay_tile(body: BodyModel, image: np.ndarray, keypoints: np.ndarray, pose: np.ndarray, betas: np.ndarray,
                 cam_t: np.ndarray) -> np.ndarray:
    """(S, 2S, 3) uint8: the crop with its keypoints, beside the mesh over the crop."""
    with torch.no_grad():
        vertices = body(torch.as_tensor(pose[None]), torch.as_tensor(betas[None])).vertices[0].cpu().numpy()
    focal, center = crop_camera(image.shape[0])
    mesh = overlay_mesh(image, vertices + cam_t, body.faces, focal, center, alpha=0.7)
    return np.concatenate([draw_keypoints(image, from_normalized(keypoints, image.shape[0])), mesh], axis=1)


def run_predict(run: str | Path, round_index: int | None, source: str | Path, out_dir: str | Path,
                keypoints_dir: str | Path | None = None, refine: bool = False, batch_size: int = 64,
                device: str = "auto", min_confidence: float = OPENPOSE_MIN_CONFIDENCE,
                max_overlays: int = 100) -> dict[str, Any]:
    """Predict (and refine) every person of `source`; see the module docstring. Returns the
    summary that _SUCCESS.json holds."""
    started = time.perf_counter()
    run, out_dir = storage.location(run), Path(out_dir)
    if (out_dir / "predictions.parquet").exists():
        raise BadInput(f"{out_dir} already holds predictions; nothing was written (choose another --out)")
    if batch_size < 1:
        raise BadInput("--batch-size must be >= 1")
    round_index = latest_round(run) if round_index is None else round_index
    if not rundir.is_done(run, round_index, "model"):
        raise BadInput(f"round {round_index} has no trained regressor in {run}")
    config = load_config(storage.join(run, "config.yaml"))
    device = resolve_device(device)
    checkpoint = storage.local_copy(storage.join(rundir.step_dir(run, round_index, "model"), "checkpoint.pt"))
    regressor = load_regressor(checkpoint, device)
    body = load_body_model(config.body_model or None, device)
    prior = load_prior(config.prior or None, device=device)
    samples, quarantine, kind = read_inputs(source, keypoints_dir, regressor.img_res, min_confidence)
    if len(samples) == 0:
        raise BadInput(f"no person to predict on in {source} ({len(quarantine)} inputs quarantined)")
    if refine and not (to_numpy(samples, "keypoints")[:, :, 2] > 0).any():
        raise BadInput("--refine fits SMPL to 2D keypoints and these inputs have none: pass --keypoints DIR")
    pred = predict(regressor, samples, batch_size=batch_size, device=device)
    keypoints = to_numpy(samples, "keypoints")
    smplify = config.smplify
    columns = refine_or_score(body, prior, keypoints, pred, refine, smplify, batch_size)
    fits = fits_table(
        samples.column("sample_id").to_pylist(), **columns,
        valid=np.isfinite(columns["loss"]) & (columns["loss"] < smplify.loss_threshold),
        betas_ok=(np.abs(columns["betas"]) <= smplify.betas_threshold).all(axis=1),
        found_in_round=round_index, init="network",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(samples, out_dir / "samples.parquet")
    write_table(quarantine, out_dir / "_quarantine.parquet")
    write_table(fits, out_dir / "predictions.parquet")
    drawn = 0
    for i, sid in enumerate(fits.column("sample_id").to_pylist()[:max_overlays]):
        image = decode_image(samples.column("image")[i].as_py())
        tile = overlay_tile(body, image, keypoints[i], columns["pose"][i], columns["betas"][i], columns["cam_t"][i])
        (out_dir / "overlays").mkdir(exist_ok=True)
        cv2.imwrite(str(out_dir / "overlays" / f"{sid}.png"), np.ascontiguousarray(tile[..., ::-1]))
        drawn += 1
    summary = {
        "round": round_index, "checkpoint": str(checkpoint), "input": str(source), "kind": kind,
        "predictions": len(fits), "quarantined": len(quarantine), "refined": bool(refine),
        "valid": int(np.asarray(fits.column("valid").to_pylist(), bool).sum()), "overlays": drawn,
        "device": str(device), "body_model": config.body_model or "built-in", "prior": config.prior or "built-in",
        "seconds": round(time.perf_counter() - started, 2), "code_version": rundir.code_version(),
    }
    rundir.write_json_atomic(out_dir / "_SUCCESS.json", summary)
    return summary


@click.command("predict")
@click.argument("source", type=click.Path())
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory or URI.")
@click.option("--round", "round_index", type=int, default=None, help="Regressor N (default: the last trained).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (new).")
@click.option("--keypoints", "keypoints_dir", type=click.Path(file_okay=False),
              help="OpenPose BODY_25 JSON folder for the images: one prediction per detected person.")
@click.option("--refine", is_flag=True, help="Refine each prediction with SMPLify on its 2D keypoints.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--min-confidence", type=float, default=OPENPOSE_MIN_CONFIDENCE, show_default=True,
              help="OpenPose: a keypoint is detected above this confidence.")
@click.option("--max-overlays", type=int, default=100, show_default=True, help="Overlay PNGs to draw at most.")
def predict_command(source, run_dir, round_index, out_dir, keypoints_dir, refine, batch_size, device, min_confidence,
                    max_overlays):
    """Run regressor N of RUN on SOURCE (a folder of images, one image, or a samples folder) and
    write DIR/predictions.parquet (the fits table's schema), the crops, overlay PNGs and
    _SUCCESS.json; --refine starts SMPLify from every prediction, as SPIN does in training."""
    summary = run_predict(run_dir, round_index, source, out_dir, keypoints_dir, refine, batch_size, device,
                          min_confidence, max_overlays)
    click.echo(f"predicted {summary['predictions']} people with regressor {summary['round']} "
               f"({summary['valid']} valid fits, {summary['quarantined']} inputs quarantined): {out_dir}")
