"""Evaluation of one round: regressor N on the test split, fits N against the held-out truth of the
train split, and the pictures that go with them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fitting.camera import crop_camera
from fitting.render import draw_keypoints, overlay_mesh
from pipeline import rundir
from pipeline.config import GENDERS, RunConfig, load_run_body_model
from pipeline.report import metrics_by_round, plot_metrics_by_round
from trainer.data import storage
from trainer.data.samples import decode_image, from_normalized
from trainer.data.storage import Location
from trainer.data.tables import SAMPLES_SCHEMA, read_split, read_table, shard_paths, to_numpy
from trainer.evaluate import TruthModels, evaluate_fits, evaluate_regressor, require_protocols, write_overlays
from trainer.train import load_regressor


def check_evaluation(config: RunConfig, models: dict[str, dict[str, str]]) -> None:
    """Before any work: a one-line error when the test split holds a dataset whose protocol the
    run's body model cannot score (SPIN's H36M, MPI-INF-3DHP and 3DPW need J_regressor_h36m)."""
    if not config.evaluate or not config.data or not storage.is_dir(storage.join(config.data, "test")):
        return
    parts = []
    for path in shard_paths(config.data, "test"):
        names = storage.parquet_metadata(path).schema.to_arrow_schema().names
        parts.append(storage.read_parquet(path, columns=[c for c in ("dataset", "protocol") if c in names]))
    if parts:
        require_protocols(pa.concat_tables(parts, promote_options="default"), load_run_body_model(models))


def truth_models(models: dict[str, dict[str, str]]) -> TruthModels:
    """The run's male and female models (3DPW's truth meshes), when it configures both."""
    if not all(f"body_model_{g}" in models for g in GENDERS):
        return TruthModels()
    return TruthModels(*(load_run_body_model(models, key=f"body_model_{g}") for g in GENDERS))


def evaluate_round(run: Location, round_index: int, config: RunConfig, models: dict[str, dict[str, str]],
                   out_dir: Path) -> dict[str, Any]:
    """Metrics of round N, each under its dataset's protocol, with the run's pinned `models`; the
    pictures go to the local folder `out_dir`. The run and the data may be URIs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    body = load_run_body_model(models)
    genders = truth_models(models)
    checkpoint = storage.join(rundir.step_dir(run, round_index, "model"), "checkpoint.pt")
    regressor = load_regressor(storage.local_copy(checkpoint))
    loaded = {"body_model": body.identity, **{f"body_model_{g}": getattr(genders, g).identity
                                               for g in GENDERS if getattr(genders, g) is not None}}
    metrics: dict[str, Any] = {"round": round_index, "models": models, "loaded": loaded}
    test_dir = storage.join(config.data, "test")
    if storage.is_dir(test_dir):
        metrics["regressor"] = evaluate_regressor(regressor, [test_dir], body, truth_models=genders)
        write_overlays(regressor, [test_dir], body, out_dir / "regressor_overlays.png")
    if rundir.is_done(run, round_index, "fits"):  # a 2D-only regressor has no fits
        fits = rundir.read_fits(run, round_index)
        if storage.is_dir(storage.join(config.data, "truth")):
            metrics["fits"] = evaluate_fits(fits, read_split(config.data, "truth"), body, genders)
        else:
            valid = to_numpy(fits, "valid")
            metrics["fits"] = {"acceptance_rate": float(np.mean(valid)) if len(valid) else 0.0}
        fit_overlay_grid(run, round_index, config, body, out_dir / "fit_overlays.png")
    rows = metrics_by_round(run) + [metrics]
    plot_metrics_by_round(sorted({r["round"]: r for r in rows}.values(), key=lambda r: r["round"]),
                          out_dir / "metrics_by_round.png")
    return metrics


def overlay_ids(config: RunConfig) -> list[str]:
    """A fixed set of train samples, the same every round: the first rows of the first shard."""
    first = shard_paths(config.data, "train")[0]
    ids = read_table(first).column("sample_id").to_pylist()
    return ids[: config.tracking.overlay_samples]


def fit_overlay_grid(run: Location, round_index: int, config: RunConfig, body, out_png: Path) -> Path | None:
    """Rows: the fixed samples; columns: the image, then their best fit after each round 0..N."""
    ids = overlay_ids(config)
    if not ids:
        return None
    first = read_table(shard_paths(config.data, "train")[0], SAMPLES_SCHEMA)
    rows = first.filter(pc.is_in(first.column("sample_id"), pa.array(ids)))
    images = [decode_image(b) for b in rows.column("image").to_pylist()]
    keypoints = to_numpy(rows, "keypoints")
    tiles = []
    for image, kp in zip(images, keypoints):
        tiles.append([draw_keypoints(image, from_normalized(kp, image.shape[0]))])
    for r in range(round_index + 1):
        if not rundir.is_done(run, r, "fits") and r != round_index:
            continue
        fits = rundir.read_fits(run, r)
        index = {sid: i for i, sid in enumerate(fits.column("sample_id").to_pylist())}
        pose, betas, cam_t = (to_numpy(fits, k) for k in ("pose", "betas", "cam_t"))
        for row, (sid, image) in enumerate(zip(rows.column("sample_id").to_pylist(), images)):
            if sid not in index:
                tiles[row].append(np.zeros_like(image))
                continue
            i = index[sid]
            with torch.no_grad():
                verts = body(torch.from_numpy(pose[i:i + 1].copy()), torch.from_numpy(betas[i:i + 1].copy())).vertices[0].numpy()
            focal, center = crop_camera(image.shape[0])  # the fit's camera, rescaled to the stored crop
            tile = overlay_mesh(image, verts + cam_t[i], body.faces, focal, center)
            tiles[row].append(tile)
    grid = np.concatenate([np.concatenate(t, axis=1) for t in tiles], axis=0)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return out_png
