"""`spin-pipeline data`: make the synthetic benchmark, ingest datasets (SPIN's .npz files, OpenPose
folders, COCO keypoint files) into a data root, and show what a root holds."""
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
from trainer.data import datasets
from trainer.data.ingest import Roots, ingest_rows, spin_rows
from trainer.data.samples import DEFAULT_MIN_VISIBLE, decode_image, decode_mask, from_normalized
from trainer.data.synth import SYNTH_PRESETS, SynthConfig
from trainer.data.synth_run import generate
from trainer.data.tables import SAMPLES_SCHEMA, read_table, shard_paths, to_numpy
from trainer.data.wild import OPENPOSE_MIN_CONFIDENCE, PersonRows, coco_rows, openpose_rows

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


FORMATS = ("spin-npz", "openpose", "coco")


def read_source(fmt: str, source: str, keypoints_dir: str | None, images_root: str | None,
                min_confidence: float) -> tuple[PersonRows, Path]:
    """The rows of a source in any format, and the folder its image names are relative to.
    BadInput for a missing or wrongly combined argument."""
    if fmt == "openpose":
        if not keypoints_dir:
            raise BadInput("--format openpose needs two arguments: IMAGES_DIR KEYPOINTS_DIR")
        if images_root and Path(images_root) != Path(source):
            raise BadInput("--format openpose reads its images from IMAGES_DIR; leave out --images")
        return openpose_rows(source, keypoints_dir, min_confidence=min_confidence), Path(source)
    if keypoints_dir:
        raise BadInput(f"--format {fmt} takes one file argument, got a second ({keypoints_dir})")
    if not images_root:
        raise BadInput(f"--format {fmt} needs --images ROOT (the folder its image names are relative to)")
    rows = spin_rows(source) if fmt == "spin-npz" else coco_rows(source)
    return rows, Path(images_root)


@data.command("ingest")
@click.argument("source", type=click.Path())
@click.argument("keypoints_dir", required=False, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="spin-npz", show_default=True,
              help="spin-npz: SPIN's dataset_extras/*.npz; openpose: IMAGES_DIR KEYPOINTS_DIR (BODY_25 JSON per "
                   "image); coco: a person_keypoints_*.json.")
@click.option("--images", "images_root", type=click.Path(), help="Folder that the image names are relative to.")
@click.option("--masks", "masks_root", type=click.Path(), help="Folder of maskname / partname (default: --images).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The data root.")
@click.option("--dataset", default=None, help="Dataset name (default: SPIN's key for its files, else the file's stem; "
                                                "'openpose' or 'coco' for those formats).")
@click.option("--split", type=click.Choice(datasets.SPLITS), default=None,
              help="train or test (default: SPIN's for its files, else train).")
@click.option("--img-size", type=int, default=IMG_RES, show_default=True)
@click.option("--shard-size", type=int, default=1000, show_default=True)
@click.option("--min-visible", type=int, default=DEFAULT_MIN_VISIBLE, show_default=True,
              help="Quarantine samples labelled by 2D keypoints with fewer of confidence > 0.")
@click.option("--min-confidence", type=float, default=OPENPOSE_MIN_CONFIDENCE, show_default=True,
              help="OpenPose: a keypoint is detected above this confidence (SPIN's demo threshold).")
@click.option("--workers", type=int, default=4, show_default=True, help="Image decoding threads.")
def ingest(source, keypoints_dir, fmt, images_root, masks_root, out_dir, dataset, split, img_size, shard_size,
           min_visible, min_confidence, workers) -> None:
    """Add one dataset to a data root: OUT/<split>/<dataset>-part-XXXXX.parquet, its quarantine
    (OUT/_quarantine/<split>/<dataset>.parquet, one reason per row) and its record
    (OUT/_datasets/<split>/<dataset>.json). A dataset already in OUT is never written again.

    \b
    spin-pipeline data ingest lsp_dataset_original_train.npz --images LSP_ORIG --out data
    spin-pipeline data ingest 3dpw_test.npz --images 3DPW --out data
    spin-pipeline data ingest --format openpose IMAGES_DIR KEYPOINTS_DIR --out data
    spin-pipeline data ingest --format coco person_keypoints_train2014.json --images COCO --out data
    """
    dataset, split = datasets.dataset_and_split(source if fmt == "spin-npz" else fmt, dataset, split)
    rows, images = read_source(fmt, source, keypoints_dir, images_root, min_confidence)
    roots = Roots(images, Path(masks_root) if masks_root else images)
    summary = ingest_rows(rows, source, fmt, roots, out_dir, dataset, split, img_size=img_size,
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


def format_root(rows: list[dict]) -> str:
    """`describe_root`'s rows as an aligned text table."""
    header = ("split", "dataset", "samples", "quarantined", "protocol")
    cells = [header] + [tuple(str(r[k]) for k in header) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells)


@data.command("show")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Also write a contact sheet PNG.")
@click.option("--num", type=int, default=16, show_default=True)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--body-model", type=click.Path(dir_okay=False), default=None, help="For GT meshes (default: built-in).")
@click.option("--json", "as_json", is_flag=True, help="The per-dataset counts as JSON.")
def show(directory, out_path, num, split, body_model, as_json) -> None:
    """Samples and quarantined rows per dataset and split, with each dataset's protocol; with
    --out, a contact sheet of samples (keypoints and skeleton, GT mesh and mask where present)."""
    if num < 1:
        raise BadInput("--num must be >= 1")
    rows = datasets.describe_root(directory)
    click.echo(json.dumps(rows) if as_json else format_root(rows))
    if out_path is None:
        return
    sheet = contact_sheet(directory, split, num, body_model=body_model)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(os.fspath(out_path), sheet[..., ::-1]):
        raise BadInput(f"could not write {out_path}")
    click.echo(f"wrote {out_path} ({sheet.shape[1]}x{sheet.shape[0]})")
