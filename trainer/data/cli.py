"""`spin-pipeline data`: make the synthetic benchmark, ingest SPIN's .npz datasets, and look at
samples on a contact sheet."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click
import cv2
import numpy as np
import pyarrow as pa
import torch

from fitting.body_model import load_body_model
from fitting.camera import IMG_RES, crop_camera, estimate_translation
from fitting.errors import BadInput
from fitting.keypoints import GT24, SKELETON
from fitting.render import draw_keypoints, overlay_mesh
from trainer.data.ingest import ingest_spin_npz
from trainer.data.samples import DEFAULT_MIN_VISIBLE, decode_image, decode_mask, from_normalized
from trainer.data.synth import SYNTH_PRESETS, SynthConfig
from trainer.data.synth_run import generate
from trainer.data.tables import SAMPLES_SCHEMA, read_table, shard_paths, to_numpy

TILE = 192


@click.group("data")
def data() -> None:
    """Make the synthetic benchmark, ingest SPIN .npz datasets, inspect shards."""


@data.command("synth")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--preset", type=click.Choice(list(SYNTH_PRESETS)), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--img-size", type=int, default=None, help="Crop size in pixels (default: the preset's).")
@click.option("--num-train", type=int, default=None, help="Training samples (default: the preset's).")
@click.option("--num-test", type=int, default=None, help="Test samples (default: the preset's).")
@click.option("--shard-size", type=int, default=None, help="Rows per parquet shard (default: the preset's).")
@click.option("--workers", type=int, default=None, help="Rendering processes (default: the CPU count).")
@click.option("--body-model", type=click.Path(dir_okay=False), default=None, help="SMPL-layout .npz (default: built-in).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in --out.")
def synth(out_dir, preset, seed, img_size, num_train, num_test, shard_size, workers, body_model, overwrite) -> None:
    """Render the synthetic benchmark: DIR/train (2D keypoints only), DIR/test (3D truth and
    masks, for evaluation), DIR/truth (the train split's truth) and DIR/dataset.json."""
    cfg = SynthConfig.from_preset(preset, seed=seed, img_size=img_size, num_train=num_train,
                                  num_test=num_test, shard_size=shard_size, body_model=body_model)
    if workers is not None and workers < 1:
        raise BadInput("--workers must be >= 1")
    summary = generate(cfg, out_dir, workers=workers, overwrite=overwrite)
    click.echo(json.dumps({k: summary[k] for k in ("counts", "seconds", "samples_per_s", "workers")}))


@data.command("ingest")
@click.argument("npz_file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["spin-npz"]), default="spin-npz", show_default=True)
@click.option("--images", "images_root", required=True, type=click.Path(), help="Folder that imgname is relative to.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--dataset", default=None, help="Dataset name (default: the file's stem).")
@click.option("--img-size", type=int, default=IMG_RES, show_default=True)
@click.option("--shard-size", type=int, default=1000, show_default=True)
@click.option("--min-visible", type=int, default=DEFAULT_MIN_VISIBLE, show_default=True,
              help="Quarantine samples with fewer keypoints of confidence > 0.")
@click.option("--workers", type=int, default=4, show_default=True, help="Image decoding threads.")
def ingest(npz_file, fmt, images_root, out_dir, dataset, img_size, shard_size, min_visible, workers) -> None:
    """Import a SPIN dataset file (dataset_extras/*.npz) and its images into sample shards;
    bad samples go to OUT/quarantine.parquet with a reason."""
    summary = ingest_spin_npz(npz_file, images_root, out_dir, dataset=dataset, img_size=img_size,
                              shard_size=shard_size, min_visible=min_visible, workers=workers)
    click.echo(json.dumps(summary))


def _read_samples(directory: str, split: str | None, num: int):
    rows = []
    for path in shard_paths(directory, split):
        table = read_table(path, SAMPLES_SCHEMA)
        rows.append(table.slice(0, num - sum(len(r) for r in rows)))
        if sum(len(r) for r in rows) >= num:
            break
    return pa.concat_tables(rows)


def _label(image: np.ndarray, text: str) -> np.ndarray:
    out = image.copy()
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)
    cv2.rectangle(out, (0, 0), (w + 4, h + base + 3), (0, 0, 0), -1)
    cv2.putText(out, text, (2, h + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _mesh_tile(model, image: np.ndarray, pose: np.ndarray, betas: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The GT mesh over the image, placed by SPIN's camera (focal 5000 at 224 px) from the
    ground-truth-block keypoints, as SPIN places its GT meshes."""
    size = image.shape[0]
    focal, center = crop_camera(size)
    with torch.no_grad():
        out = model(torch.tensor(pose[None], dtype=torch.float32), torch.tensor(betas[None], dtype=torch.float32))
    kp = from_normalized(keypoints, size)
    gt = np.zeros_like(kp)
    gt[list(GT24)] = kp[list(GT24)]
    if (gt[:, 2] > 0).sum() < 4:
        gt = kp
    cam_t = estimate_translation(out.keypoints, torch.as_tensor(gt[None], dtype=torch.float32), focal, size)
    vertices = (out.vertices[0] + cam_t[0]).numpy()
    return overlay_mesh(image, vertices, model.faces, focal, center, alpha=0.6)


def contact_sheet(directory: str, split: str | None = "train", num: int = 16, columns: int | None = None,
                  body_model: str | None = None) -> np.ndarray:
    """(H, W, 3) uint8 sheet: per sample the crop with keypoints and skeleton; next to it the GT
    mesh overlay and the mask when the sample has them."""
    table = _read_samples(directory, split, num)
    keypoints = to_numpy(table, "keypoints")
    has_gt = table.column("pose").is_valid().to_numpy(zero_copy_only=False)
    model = None
    if has_gt.any():
        model = load_body_model(body_model)
        pose, betas = to_numpy(table, "pose"), to_numpy(table, "betas")
    tiles = []
    for i, sid in enumerate(table.column("sample_id").to_pylist()):
        image = cv2.resize(decode_image(table.column("image")[i].as_py()), (TILE, TILE), interpolation=cv2.INTER_LINEAR)
        group = [_label(draw_keypoints(image, from_normalized(keypoints[i], TILE), SKELETON, radius=3), sid)]
        if has_gt[i]:
            group.append(_mesh_tile(model, image, pose[i], betas[i], keypoints[i]))
        mask = table.column("mask")[i].as_py()
        if mask is not None:
            m = cv2.resize(decode_mask(mask), (TILE, TILE), interpolation=cv2.INTER_NEAREST)
            group.append(np.repeat((m > 0).astype(np.uint8)[..., None] * 255, 3, axis=2))
        tiles.append(np.concatenate(group, axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    columns = columns or max(1, int(np.ceil(np.sqrt(len(tiles) * TILE / width) - 1e-9)))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r:r + columns], axis=1) for r in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


@data.command("show")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--num", type=int, default=16, show_default=True)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--body-model", type=click.Path(dir_okay=False), default=None, help="For GT meshes (default: built-in).")
def show(directory, out_path, num, split, body_model) -> None:
    """A contact sheet of samples: keypoints and skeleton, and the GT mesh and mask where present."""
    if num < 1:
        raise BadInput("--num must be >= 1")
    sheet = contact_sheet(directory, split, num, body_model=body_model)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(os.fspath(out_path), sheet[..., ::-1]):
        raise BadInput(f"could not write {out_path}")
    click.echo(f"wrote {out_path} ({sheet.shape[1]}x{sheet.shape[0]})")
