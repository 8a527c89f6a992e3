"""Evaluation of a regressor on a test split and of a best-fit table against the truth, each
sample under its dataset's protocol (`trainer.data.protocols`): SPIN's `eval.py` for SPIN's
datasets, the built-in benchmark's own for the rest.

Every evaluation returns a JSON-able dict: the split's counts, then each protocol's numbers in a
dict that names its protocol ("protocol"). With one protocol its numbers sit at the top level
beside its name; with several, the largest group's sit there and "by_protocol" holds every group's.

Segmentation renders the predicted mesh with SPIN's camera: for the 'crop' protocols at the stored
crop's size against the crop's masks; for 'image' (SPIN's LSP) in SPIN's 224-px crop, un-cropped
onto the original image as SPIN's `uncrop` does, against the full-image masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pyarrow as pa
import torch

from fitting.body_model import BodyModel
from fitting.camera import FOCAL_LENGTH, IMG_RES, crop_camera
from fitting.errors import BadInput
from fitting.keypoint_body import KeypointBody
from fitting.keypoints import GT24
from fitting.render import overlay_mesh, part_labels, render_labels
from trainer.data.protocols import (
    PROTOCOLS,
    Protocol,
    h36m_eval_joints,
    lsp14_joints,
    lsp14_truth,
    row_protocols,
    s_eval_joints,
)
from trainer.data.samples import decode_mask, uncrop_labels
from trainer.data.tables import FITS_SCHEMA, SAMPLES_SCHEMA, conform, to_numpy
from trainer.dataset import SamplesDataset, load_image, make_loader, read_samples
from trainer.metrics import confusion_matrix, pose_metrics, segmentation_scores
from trainer.model import Regressor, cam_translation, model_input
from trainer.train import predict

NUM_PARTS = 7                                  # background + six parts
IGNORE = 255                                   # UP-3D's "no label" in part images
TABLE_KEYS = ("mpjpe", "pa_mpjpe", "pck", "auc", "pa_pck", "pa_auc", "fg_accuracy", "fg_f1",
              "parts_accuracy", "parts_f1", "acceptance_rate")
JOINT_COUNT = {"lsp14": 14, "h36m14": 14, "h36m17": 17}
MeshesSeen = Callable[[np.ndarray, torch.Tensor], None]


@dataclass
class TruthModels:
    """The bodies that turn a true pose and shape into SPIN's 3DPW truth mesh: the male and female
    models, by each sample's gender. Without them the neutral model stands in, and the result
    says so ("truth_model")."""
    male: BodyModel | None = None
    female: BodyModel | None = None

    def for_gender(self, gender: str | None, neutral: BodyModel) -> BodyModel:
        chosen = {"m": self.male, "f": self.female}.get(gender or "")
        return chosen if chosen is not None and self.male is not None and self.female is not None else neutral

    @property
    def gendered(self) -> bool:
        return self.male is not None and self.female is not None


def _finite_rows(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values.reshape(len(values), -1)).all(axis=1)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.buffers()).device


@torch.no_grad()
def _eval_joints(protocol: Protocol, body_model: BodyModel, model: BodyModel, pose: np.ndarray, betas: np.ndarray,
                 batch_size: int = 256, on_batch: MeshesSeen | None = None) -> np.ndarray:
    """(N, 72), (N, 10) -> (N, J, 3) the protocol's joints of `model`'s meshes, centred as it says;
    the H36M joints through `body_model`'s J_regressor_h36m (SPIN uses the one regressor for the
    prediction and the 3DPW truth). `on_batch(indices, meshes)` sees each batch's meshes."""
    device = _device(model)
    parts = [np.zeros((0, JOINT_COUNT[protocol.joints], 3))]
    # the built-in protocol reads keypoints only: where no one looks at the meshes, skin just the
    # vertices the keypoints use (the same keypoints, a fraction of the work)
    keypoints_only = KeypointBody(model) if protocol.joints == "lsp14" and on_batch is None else None
    for start in range(0, len(pose), batch_size):
        pose_t = torch.as_tensor(pose[start:start + batch_size], dtype=torch.float32, device=device)
        betas_t = torch.as_tensor(betas[start:start + batch_size], dtype=torch.float32, device=device)
        if keypoints_only is not None:
            parts.append(lsp14_joints(keypoints_only(pose_t, betas_t)[:, list(GT24)]).double().cpu().numpy())
            continue
        out = model(pose_t, betas_t)
        if on_batch is not None:
            on_batch(np.arange(start, start + len(out.vertices)), out.vertices)
        if protocol.joints == "lsp14":
            joints = lsp14_joints(out.keypoints[:, list(GT24)])
        else:
            h36m = body_model.h36m_joints(out.vertices.to(_device(body_model)), f"SPIN's {protocol.name} protocol")
            joints = h36m_eval_joints(h36m, protocol.joints)
        parts.append(joints.double().cpu().numpy())
    return np.concatenate(parts)


def true_joints(protocol: Protocol, table: pa.Table, body_model: BodyModel, truth_models: TruthModels,
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """The truth of a protocol's rows: (N, J, 3) joints (metres, centred as the protocol says), (N, J)
    which count, and notes (3DPW: which meshes gave the truth)."""
    n, count = len(table), JOINT_COUNT[protocol.joints]
    joints, counts, notes = np.zeros((n, count, 3)), np.zeros((n, count), bool), {}
    pose = to_numpy(table, "pose") if "pose" in table.column_names else np.full((n, 72), np.nan)
    betas = to_numpy(table, "betas") if "betas" in table.column_names else np.full((n, 10), np.nan)
    has_pose = _finite_rows(pose) & _finite_rows(betas)
    if protocol.truth == "joints3d":
        stored = to_numpy(table, "joints3d") if "joints3d" in table.column_names else np.full((n, 24, 4), np.nan)
        have = _finite_rows(stored)
        S = torch.as_tensor(stored[have])
        found, found_counts = lsp14_truth(S) if protocol.joints == "lsp14" else s_eval_joints(S, protocol.joints)
        joints[have], counts[have] = found.numpy(), found_counts.numpy()
        if protocol.joints == "lsp14":  # the built-in protocol also reads a true pose and shape
            todo = ~have & has_pose
            joints[todo] = _eval_joints(protocol, body_model, body_model, pose[todo], betas[todo], batch_size)
            counts[todo] = True
        return joints, counts, notes
    genders = table.column("gender").to_pylist() if "gender" in table.column_names else [None] * n
    for model in {id(m): m for m in (truth_models.for_gender(g, body_model) for g in genders)}.values():
        if model.num_vertices != body_model.num_vertices:
            raise BadInput(f"{model.name} has {model.num_vertices} vertices, the body model {body_model.num_vertices}")
        rows = np.array([truth_models.for_gender(g, body_model) is model for g in genders]) & has_pose
        joints[rows] = _eval_joints(protocol, body_model, model, pose[rows], betas[rows], batch_size)
        counts[rows] = True
    notes["truth_model"] = "gendered" if truth_models.gendered else "neutral"
    return joints, counts, notes


def require_protocols(table: pa.Table, body_model: BodyModel) -> list[str]:
    """The rows' protocols, after checking that the body model can score them (BadInput, before
    any work, when a protocol needs J_regressor_h36m and the model has none)."""
    names = row_protocols(table)
    needs = sorted({n for n in names if PROTOCOLS[n].joints.startswith("h36m")})
    if needs and not body_model.has_h36m_regressor:
        body_model.h36m_joints(torch.zeros(1, body_model.num_vertices, 3), f"SPIN's {needs[0]} protocol")
    return names


def score_poses(table: pa.Table, pose: np.ndarray, betas: np.ndarray, body_model: BodyModel,
                truth_models: TruthModels | None = None, batch_size: int = 256,
                on_batch: Callable[[str, np.ndarray, torch.Tensor], None] | None = None) -> dict[str, dict]:
    """Per protocol of the table's rows: its rows, per-sample 3D metrics (NaN where a row has no
    truth) of the predicted (N, 72) poses and (N, 10) shapes, and notes. `on_batch(protocol, table
    rows, meshes)` sees the predicted meshes as they are made."""
    truth_models = truth_models or TruthModels()
    names = np.asarray(require_protocols(table, body_model))
    groups = {}
    for name in dict.fromkeys(names.tolist()):
        protocol, rows = PROTOCOLS[name], np.flatnonzero(names == name)
        group = {"rows": rows, "values": {}, "notes": {}}
        groups[name] = group
        if not protocol.joints:
            continue
        gt, counts, group["notes"] = true_joints(protocol, table.take(pa.array(rows)), body_model, truth_models, batch_size)
        usable = counts.any(axis=1) & _finite_rows(pose[rows]) & _finite_rows(betas[rows])
        seen = None if on_batch is None else (lambda local, meshes, name=name, at=rows[usable]: on_batch(name, at[local], meshes))
        pred = _eval_joints(protocol, body_model, body_model, pose[rows][usable], betas[rows][usable], batch_size, seen)
        metrics = pose_metrics(torch.as_tensor(pred), torch.as_tensor(gt[usable]), torch.as_tensor(counts[usable]),
                               with_pck=protocol.pck)
        for key, value in metrics.items():
            group["values"][key] = np.full(len(rows), np.nan)
            group["values"][key][usable] = value.numpy()
    return groups


def summarize_group(group: dict, select: np.ndarray | None = None, prefix: str = "") -> dict:
    """A protocol's numbers: means over its rows (`select`: a subset of them) that have a truth."""
    values = {k: v if select is None else v[select] for k, v in group["values"].items()}
    out: dict = {f"{prefix}{k}": float(np.nanmean(v)) for k, v in values.items() if np.isfinite(v).any()}
    if values:
        out[f"{prefix}evaluated_3d"] = int(np.isfinite(values["mpjpe"]).sum())
    return out


def describe_group(name: str, group: dict) -> dict:
    return {"protocol": name, "description": PROTOCOLS[name].description, "samples": len(group["rows"]),
            **group["notes"]}


def report(per_protocol: dict[str, dict]) -> dict:
    """Per-protocol numbers as evaluations return them (see the module docstring)."""
    if not per_protocol:
        return {}
    largest = max(per_protocol, key=lambda name: per_protocol[name]["samples"])
    out = dict(per_protocol[largest])
    if len(per_protocol) > 1:
        out["by_protocol"] = per_protocol
    return out


class Segmentation:
    """FB and six-part scores of one protocol's predicted meshes on the rows that have masks,
    accumulated over the whole split (see the module docstring for the two frames)."""

    def __init__(self, protocol: Protocol, table: pa.Table, rows: np.ndarray, cam: np.ndarray, body_model: BodyModel):
        """`rows`: the table rows of this protocol; `cam` (N, 3): every row's predicted camera."""
        self.protocol, self.cam, self.body_model = protocol, cam, body_model
        self.masks, self.part_masks = table.column("mask").to_pylist(), table.column("part_mask").to_pylist()
        self.center, self.scale = to_numpy(table, "center"), table.column("scale").to_numpy(zero_copy_only=False)
        self.labels, self.faces = part_labels(body_model), body_model.faces
        self.todo = {int(k) for k in rows if self.masks[k] is not None}
        self.fg = np.zeros((2, 2), np.int64)
        self.parts = np.zeros((NUM_PARTS, NUM_PARTS), np.int64)
        self.ignored = 0              # part pixels labelled 255 (no label)
        self.ignored_background = 0   # of those, predicted background
        self.segmented = 0

    @torch.no_grad()
    def add_meshes(self, rows: np.ndarray, vertices: torch.Tensor) -> None:
        """The (B, V, 3) predicted meshes (no camera) of `rows` of the table."""
        cam_t = cam_translation(torch.as_tensor(self.cam[rows], dtype=torch.float32, device=vertices.device))
        for k, verts in zip(rows, (vertices + cam_t[:, None]).cpu().numpy()):
            if k in self.todo:
                self.todo.discard(k)
                self.add(*_rendered_labels(self.protocol, verts, self.masks[k], self.part_masks[k], self.center[k],
                                           self.scale[k], self.labels, self.faces))

    @torch.no_grad()
    def finish(self, pose: np.ndarray, betas: np.ndarray, batch_size: int = 64) -> dict[str, float]:
        """Render the rows that no scoring pass made meshes for, then the scores."""
        rows, device = np.array(sorted(self.todo), dtype=np.int64), _device(self.body_model)
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            out = self.body_model(torch.as_tensor(pose[batch], dtype=torch.float32, device=device),
                                  torch.as_tensor(betas[batch], dtype=torch.float32, device=device))
            self.add_meshes(batch, out.vertices)
        return self.scores() if self.segmented else {}

    def add(self, gt_mask: np.ndarray, pred_mask: np.ndarray, gt_parts: np.ndarray | None, pred_parts: np.ndarray) -> None:
        self.fg += confusion_matrix(pred_mask, gt_mask, 2, ignore=None)
        if gt_parts is not None:
            self.parts += confusion_matrix(pred_parts, gt_parts, NUM_PARTS, ignore=IGNORE)
            self.ignored += int((gt_parts == IGNORE).sum())
            self.ignored_background += int(((gt_parts == IGNORE) & (pred_parts == 0)).sum())
        self.segmented += 1

    def scores(self) -> dict[str, float]:
        out: dict[str, float] = {"segmented": self.segmented}
        out.update({f"fg_{k}": v for k, v in segmentation_scores(self.fg).items()})
        if self.parts.sum():
            out.update({f"parts_{k}": v for k, v in
                        segmentation_scores(self.parts, self.ignored, self.ignored_background).items()})
        return out


def _rendered_labels(protocol: Protocol, verts: np.ndarray, mask: bytes, part_mask: bytes | None, center: np.ndarray,
                     scale: float, labels: np.ndarray, faces: np.ndarray):
    """One sample's (true mask, predicted mask, true parts or None, predicted parts), in the frame
    its protocol scores."""
    gt_mask = decode_mask(mask) > 0
    gt_parts = decode_mask(part_mask) if part_mask is not None else None
    if protocol.segmentation == "image":  # SPIN renders its 224-px crop and un-crops it
        mask, parts = render_labels(verts, faces, FOCAL_LENGTH, (IMG_RES / 2.0, IMG_RES / 2.0), IMG_RES, labels)
        pred_mask = uncrop_labels(mask.astype(np.uint8), center, scale, gt_mask.shape) > 0
        return gt_mask, pred_mask, gt_parts, uncrop_labels(parts, center, scale, gt_mask.shape)
    focal, principal = crop_camera(gt_mask.shape[0])
    mask, parts = render_labels(verts, faces, focal, principal, gt_mask.shape, labels)
    return gt_mask, mask, gt_parts, parts


def evaluate_predictions(samples: pa.Table, pred: dict[str, np.ndarray], body_model: BodyModel,
                         truth_models: TruthModels | None = None, with_segmentation: bool = True) -> dict[str, dict]:
    """Per protocol, the numbers of predicted pose (N, 72), betas (N, 10) and, for segmentation,
    weak-perspective cam (N, 3), one row per sample."""
    samples = conform(samples, SAMPLES_SCHEMA)
    segmenting = with_segmentation and "cam" in pred
    names = np.asarray(row_protocols(samples))
    segmentations = {name: Segmentation(PROTOCOLS[name], samples, np.flatnonzero(names == name), pred["cam"], body_model)
                     for name in dict.fromkeys(names.tolist()) if segmenting and PROTOCOLS[name].segmentation}

    def seen(name: str, rows: np.ndarray, vertices: torch.Tensor) -> None:  # one pass of meshes for both
        if name in segmentations:
            segmentations[name].add_meshes(rows, vertices)

    groups = score_poses(samples, pred["pose"], pred["betas"], body_model, truth_models, on_batch=seen)
    out = {}
    for name, group in groups.items():
        out[name] = {**describe_group(name, group), **summarize_group(group)}
        if name in segmentations:
            out[name].update(segmentations[name].finish(pred["pose"], pred["betas"]))
    return out


def evaluate_regressor(
    regressor: Regressor,
    test_dirs: Sequence[str | Path],
    body_model: BodyModel,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    max_samples: int | None = None,
    segmentation: bool = True,
    truth_models: TruthModels | None = None,
) -> dict:
    """3D metrics (mm, %) and segmentation scores of the regressor on the test split, by protocol."""
    samples = read_samples(test_dirs, split="test")
    if max_samples is not None:
        samples = samples.slice(0, max_samples)
    require_protocols(samples, body_model)
    pred = predict(regressor, samples, batch_size=batch_size, device=device, num_workers=num_workers)
    per = evaluate_predictions(samples, pred, body_model, truth_models, with_segmentation=segmentation)
    return {"samples": len(samples), "unreadable_images": int((~pred["ok"]).sum()), **report(per)}


def evaluate_mean_pose(test_dirs: Sequence[str | Path], body_model: BodyModel, pose: np.ndarray,
                       betas: np.ndarray, truth_models: TruthModels | None = None) -> dict:
    """3D metrics of one (72,) pose and (10,) betas predicted for every test sample, whatever its
    image: the floor a regressor must beat to show that it reads the pose from the images."""
    samples = read_samples(test_dirs, split="test")
    n = len(samples)
    pred = {"pose": np.repeat(np.asarray(pose, np.float32)[None], n, 0),
            "betas": np.repeat(np.asarray(betas, np.float32)[None], n, 0)}
    return {"samples": n, **report(evaluate_predictions(samples, pred, body_model, truth_models, False))}


def evaluate_fits(fits_table: pa.Table, truth_table: pa.Table, body_model: BodyModel,
                  truth_models: TruthModels | None = None, batch_size: int = 256) -> dict:
    """How good the pseudo-labels are: the 3D metrics of the fits against the truth (all fits,
    and `valid_*` over the accepted ones), the acceptance rate and the mean fit loss."""
    fits = conform(fits_table, FITS_SCHEMA)
    truth = conform(truth_table, SAMPLES_SCHEMA)
    where = {sid: i for i, sid in enumerate(truth.column("sample_id").to_pylist())}
    rows = np.array([where.get(sid, -1) for sid in fits.column("sample_id").to_pylist()], dtype=np.int64)
    valid = to_numpy(fits, "valid").astype(bool)
    loss = to_numpy(fits, "loss").astype(np.float64)
    result: dict = {
        "fits": len(fits), "acceptance_rate": float(valid.mean()) if len(fits) else float("nan"),
        "mean_loss": float(np.nanmean(loss)) if np.isfinite(loss).any() else float("nan"),
        "betas_ok_rate": float(to_numpy(fits, "betas_ok").astype(bool).mean()) if len(fits) else float("nan"),
    }
    matched = np.flatnonzero(rows >= 0)
    groups = score_poses(truth.take(pa.array(rows[matched])), to_numpy(fits, "pose")[matched],
                         to_numpy(fits, "betas")[matched], body_model, truth_models, batch_size)
    per = {}
    for name, group in groups.items():
        accepted = valid[matched][group["rows"]]
        per[name] = {**describe_group(name, group), **summarize_group(group),
                     **summarize_group(group, accepted, prefix="valid_")}
    result["matched"] = int(sum(p.get("evaluated_3d", 0) for p in per.values()))
    return {**result, **report(per)}


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
    out = regressor(model_input(regressor, {k: v.to(device) for k, v in batch.items()}))
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
