"""Evaluation of a regressor on a test split and of a best-fit table against the truth.

Every function returns a flat, JSON-able dict of numbers (MLflow logs it as is). The 3D metrics
are `trainer.metrics`'; the ground truth of a sample is its `joints3d` (24 ground-truth joints,
camera frame) when present, else its SMPL pose and shape through the body model. Segmentation
renders the predicted mesh with SPIN's camera scaled to the stored crop's size and compares it to
the crop's foreground and six-part masks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from fitting.camera import crop_camera
from fitting.errors import BadInput
from fitting.keypoints import LSP14
from fitting.render import overlay_mesh, part_labels, render
from trainer.data.samples import decode_mask
from trainer.data.tables import FITS_SCHEMA, SAMPLES_SCHEMA, conform, to_numpy
from trainer.dataset import SamplesDataset, load_image, make_loader, read_samples
from trainer.metrics import confusion_matrix, pose_metrics, segmentation_scores, summarize
from trainer.model import Regressor, cam_translation, normalize_images

LSP_IN_GT24 = [k - LSP14[0] for k in LSP14]   # rows of joints3d that hold the 14 LSP joints
NUM_PARTS = 7                                  # background + six parts
TABLE_KEYS = ("mpjpe", "pa_mpjpe", "pck", "auc", "pa_pck", "pa_auc", "fg_accuracy", "fg_f1",
              "parts_accuracy", "parts_f1", "acceptance_rate")


def _finite_rows(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values.reshape(len(values), -1)).all(axis=1)


@torch.no_grad()
def ground_truth_lsp(table: pa.Table, body_model: torch.nn.Module, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(N, 14, 3) true LSP joints (metres) of a samples or truth table and (N,) whether a row has
    any: from joints3d where finite, else from finite pose and betas."""
    n = len(table)
    out = np.full((n, 14, 3), np.nan, np.float64)
    if "joints3d" in table.column_names:
        joints = to_numpy(table, "joints3d")[:, LSP_IN_GT24, :3]
        ok = _finite_rows(joints)
        out[ok] = joints[ok]
    if "pose" in table.column_names and "betas" in table.column_names:
        pose, betas = to_numpy(table, "pose"), to_numpy(table, "betas")
        todo = np.flatnonzero(~_finite_rows(out) & _finite_rows(pose) & _finite_rows(betas))
        out[todo] = _model_lsp(body_model, pose[todo], betas[todo], batch_size)
    return out, _finite_rows(out)


def _model_lsp(body_model: torch.nn.Module, pose: np.ndarray, betas: np.ndarray, batch_size: int) -> np.ndarray:
    device = next(body_model.buffers()).device
    parts = [np.zeros((0, 14, 3))]
    for s in range(0, len(pose), batch_size):
        out = body_model(torch.as_tensor(pose[s:s + batch_size], dtype=torch.float32, device=device),
                         torch.as_tensor(betas[s:s + batch_size], dtype=torch.float32, device=device))
        parts.append(out.keypoints[:, list(LSP14)].double().cpu().numpy())
    return np.concatenate(parts)


def _pose_summary(pred: np.ndarray, gt: np.ndarray, prefix: str = "") -> dict[str, float]:
    if len(pred) == 0:
        return {}
    values = pose_metrics(torch.as_tensor(pred), torch.as_tensor(gt))
    return {f"{prefix}{k}": v for k, v in summarize(values).items()}


@torch.no_grad()
def evaluate_regressor(
    regressor: Regressor,
    test_dirs: Sequence[str | Path],
    body_model: torch.nn.Module,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    max_samples: int | None = None,
    segmentation: bool = True,
) -> dict[str, float]:
    """3D metrics (mm, %) and segmentation scores of the regressor on the test split."""
    samples = read_samples(test_dirs, split="test")
    if max_samples is not None:
        samples = samples.slice(0, max_samples)
    device = torch.device(device)
    regressor = regressor.to(device).eval()
    body_model = body_model.to(device)
    gt, has_gt = ground_truth_lsp(samples, body_model)
    dataset = SamplesDataset(samples, None, regressor.img_res, augment=None, drop_invalid=False)
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    masks = samples.column("mask").to_pylist()
    part_masks = samples.column("part_mask").to_pylist()
    labels = part_labels(body_model) if segmentation else None
    faces = body_model.faces
    fg = np.zeros((2, 2), np.int64)
    parts = np.zeros((NUM_PARTS, NUM_PARTS), np.int64)
    segmented = unreadable = 0
    pred = np.zeros((len(samples), 14, 3))
    for batch in tqdm(loader, desc="eval", unit="batch", disable=None, leave=False):  # a bar on a terminal only
        rows = batch["row"].numpy()
        out = regressor(normalize_images(batch["image"].to(device)))
        body = body_model(out.rotmat, out.betas)
        pred[rows] = body.keypoints[:, list(LSP14)].double().cpu().numpy()
        unreadable += int((~batch["usable"]).sum())
        if not segmentation:
            continue
        verts = (body.vertices + cam_translation(out.cam)[:, None]).cpu().numpy()
        for k, row in enumerate(rows):
            if masks[row] is None:
                continue
            gt_mask = decode_mask(masks[row]) > 0
            focal, center = crop_camera(gt_mask.shape[0])
            rendered = render(verts[k], faces, focal, center, gt_mask.shape, part_labels=labels)
            fg += confusion_matrix(rendered.mask, gt_mask, 2)
            if part_masks[row] is not None:
                parts += confusion_matrix(rendered.parts, decode_mask(part_masks[row]), NUM_PARTS)
            segmented += 1
    result: dict[str, float] = {"samples": len(samples), "evaluated_3d": int(has_gt.sum()),
                                "unreadable_images": unreadable}
    result.update(_pose_summary(pred[has_gt], gt[has_gt]))
    if segmented:
        result["segmented"] = segmented
        result.update({f"fg_{k}": v for k, v in segmentation_scores(fg).items()})
        if parts.sum():
            result.update({f"parts_{k}": v for k, v in segmentation_scores(parts).items()})
    return result


@torch.no_grad()
def evaluate_mean_pose(test_dirs: Sequence[str | Path], body_model: torch.nn.Module, pose: np.ndarray,
                       betas: np.ndarray) -> dict[str, float]:
    """3D metrics of one (72,) pose and (10,) betas predicted for every test sample, whatever its
    image: the floor a regressor must beat to show that it reads the pose from the images."""
    samples = read_samples(test_dirs, split="test")
    gt, has_gt = ground_truth_lsp(samples, body_model)
    n = int(has_gt.sum())
    pred = _model_lsp(body_model, np.repeat(np.asarray(pose)[None], n, 0), np.repeat(np.asarray(betas)[None], n, 0), 256)
    return {"samples": len(samples), "evaluated_3d": n, **_pose_summary(pred, gt[has_gt])}


@torch.no_grad()
def evaluate_fits(fits_table: pa.Table, truth_table: pa.Table, body_model: torch.nn.Module,
                  batch_size: int = 256) -> dict[str, float]:
    """How good the pseudo-labels are: the 3D metrics of the fits against the truth (all fits,
    and `valid_*` over the accepted ones), the acceptance rate and the mean fit loss."""
    fits = conform(fits_table, FITS_SCHEMA)
    truth = conform(truth_table, SAMPLES_SCHEMA)
    where = {sid: i for i, sid in enumerate(truth.column("sample_id").to_pylist())}
    rows = np.array([where.get(sid, -1) for sid in fits.column("sample_id").to_pylist()], dtype=np.int64)
    valid = to_numpy(fits, "valid").astype(bool)
    loss = to_numpy(fits, "loss").astype(np.float64)
    result: dict[str, float] = {
        "fits": len(fits), "acceptance_rate": float(valid.mean()) if len(fits) else float("nan"),
        "mean_loss": float(np.nanmean(loss)) if np.isfinite(loss).any() else float("nan"),
        "betas_ok_rate": float(to_numpy(fits, "betas_ok").astype(bool).mean()) if len(fits) else float("nan"),
    }
    matched = np.flatnonzero(rows >= 0)
    if len(matched) == 0:
        result["matched"] = 0
        return result
    gt, has_gt = ground_truth_lsp(truth.take(pa.array(rows[matched])), body_model, batch_size)
    pose, betas = to_numpy(fits, "pose")[matched], to_numpy(fits, "betas")[matched]
    usable = has_gt & _finite_rows(pose) & _finite_rows(betas)
    pred = _model_lsp(body_model, pose[usable], betas[usable], batch_size)
    result["matched"] = int(usable.sum())
    result.update(_pose_summary(pred, gt[usable]))
    accepted = valid[matched][usable]
    result.update(_pose_summary(pred[accepted], gt[usable][accepted], prefix="valid_"))
    return result


@torch.no_grad()
def write_overlays(regressor: Regressor, test_dirs: Sequence[str | Path], body_model: torch.nn.Module,
                   path: str | Path, num: int = 8, columns: int = 4, device: str | torch.device = "cpu") -> Path:
    """A PNG grid: each of the first `num` test crops beside the predicted mesh over it."""
    samples = read_samples(test_dirs, split="test").slice(0, num)
    if len(samples) == 0:
        raise BadInput("no samples to draw")
    device = torch.device(device)
    regressor = regressor.to(device).eval()
    body_model = body_model.to(device)
    dataset = SamplesDataset(samples, None, regressor.img_res, augment=None, drop_invalid=False)
    batch = next(iter(make_loader(dataset, batch_size=num)))
    out = regressor(normalize_images(batch["image"].to(device)))
    verts = (body_model(out.rotmat, out.betas).vertices + cam_translation(out.cam)[:, None]).cpu().numpy()
    labels = part_labels(body_model)
    tiles = []
    for k in range(len(samples)):
        try:
            image = load_image(samples.column("image")[k].as_py(), samples.column("image_uri")[k].as_py())
        except BadInput:
            image = np.zeros((regressor.img_res, regressor.img_res, 3), np.uint8)
        focal, center = crop_camera(image.shape[0])
        mesh = overlay_mesh(image, verts[k], body_model.faces, focal, center, alpha=0.7, part_labels=labels)
        tile = np.concatenate([image, mesh], axis=1)
        tiles.append(cv2.resize(tile, (2 * 160, 160), interpolation=cv2.INTER_AREA))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    grid = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(grid[..., ::-1])):
        raise BadInput(f"cannot write {path}")
    return path


def _cell(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    fractional = key.endswith(("rate", "f1", "accuracy"))
    return f"{value:.3f}" if fractional else f"{value:.1f}"


def format_table(rows: dict[str, dict[str, float]], keys: Sequence[str] = TABLE_KEYS) -> str:
    """Rows of metrics (name -> metrics) as a fixed-width text table: millimetres and
    percentages with one decimal, rates, accuracies and F1 with three; only the columns that
    some row has."""
    keys = [k for k in keys if any(k in r for r in rows.values())]
    name_width = max([len("run")] + [len(n) for n in rows])
    widths = [max(len(k), 8) for k in keys]
    lines = ["  ".join(["run".ljust(name_width)] + [k.rjust(w) for k, w in zip(keys, widths)])]
    for name, row in rows.items():
        cells = [_cell(k, row.get(k)).rjust(w) for k, w in zip(keys, widths)]
        lines.append("  ".join([name.ljust(name_width)] + cells))
    return "\n".join(lines)
