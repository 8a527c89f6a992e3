"""Evaluation metrics as pure functions.

3D, on joints already centred as their protocol says (`trainer.data.protocols`), in metres, with
an optional (B, J) mask of the joints that count; errors in millimetres:
    MPJPE      mean per-joint position error
    PA-MPJPE   the same after the similarity transform (rotation, scale, translation) of the
               prediction that best fits the truth over the joints that count: SPIN's
               `reconstruction_error`
    PCK / AUC  MPI-INF-3DHP's test code: the percentage of joints whose error is strictly below
               150 mm, and the mean of that percentage over the thresholds 0, 5, ..., 150 mm
               (so a perfect prediction has AUC 30/31 = 96.8%); without and with the alignment
Segmentation: accuracy and macro F1 from a confusion matrix accumulated over the whole test set,
as SPIN (after UP-3D) evaluates LSP: foreground/background (2 classes) and the six parts plus
background (7 classes).
Pose bias: the rotation every fit shares per joint (`shared_rotation_error`), as an angle.
"""
from __future__ import annotations

import numpy as np
import roma
import torch

from fitting.geometry import similarity_align

PCK_THRESHOLD_MM = 150.0
AUC_THRESHOLDS_MM = tuple(float(t) for t in np.linspace(0.0, 150.0, 31))


def joint_errors(pred: torch.Tensor, gt: torch.Tensor, counts: torch.Tensor | None = None,
                 align: bool = False) -> torch.Tensor:
    """(B, J, 3) predicted and true joints in metres, centred by their protocol, and (B, J) bool
    joints that count -> (B, J) distances in mm, NaN where a joint does not count. With `align`,
    the prediction first takes the similarity transform that best fits it to the truth over the
    joints that count."""
    pred, gt = pred.double(), gt.double()
    if align:
        pred = similarity_align(pred, gt, None if counts is None else counts.double())
    errors = 1000.0 * (pred - gt).norm(dim=-1)
    return errors if counts is None else torch.where(counts, errors, float("nan"))


def mpjpe(pred: torch.Tensor, gt: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean per-joint position error in mm over the joints that count."""
    return joint_errors(pred, gt, counts).nanmean(dim=-1)


def pa_mpjpe(pred: torch.Tensor, gt: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) reconstruction error: MPJPE after the similarity alignment, in mm."""
    return joint_errors(pred, gt, counts, align=True).nanmean(dim=-1)


def pck(errors: torch.Tensor, threshold: float = PCK_THRESHOLD_MM) -> torch.Tensor:
    """(B, J) joint errors in mm (NaN: not counted) -> (B,) percentage of the counted joints
    whose error is below `threshold` (strictly, as MPI-INF-3DHP's test code counts)."""
    counted = ~torch.isnan(errors)
    hits = ((errors < threshold) & counted).double().sum(dim=-1)
    return 100.0 * hits / counted.double().sum(dim=-1)


def auc(errors: torch.Tensor, thresholds: tuple[float, ...] = AUC_THRESHOLDS_MM) -> torch.Tensor:
    """(B, J) joint errors in mm -> (B,) mean PCK (%) over `thresholds`."""
    return torch.stack([pck(errors, t) for t in thresholds], dim=-1).mean(dim=-1)


def pose_metrics(pred: torch.Tensor, gt: torch.Tensor, counts: torch.Tensor | None = None,
                 with_pck: bool = True) -> dict[str, torch.Tensor]:
    """(B, J, 3) each, metres, centred; (B, J) joints that count -> per-sample (B,) mpjpe,
    pa_mpjpe (mm) and, `with_pck`, pck, auc, pa_pck, pa_auc (%)."""
    raw = joint_errors(pred, gt, counts)
    aligned = joint_errors(pred, gt, counts, align=True)
    out = {"mpjpe": raw.nanmean(dim=-1), "pa_mpjpe": aligned.nanmean(dim=-1)}
    if with_pck:
        out.update(pck=pck(raw), auc=auc(raw), pa_pck=pck(aligned), pa_auc=auc(aligned))
    return out


def shared_rotation_error(pose: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(N, 24 * 3) fitted and true axis-angle poses -> (24,) degrees per joint of the mean (the
    rotation closest to the average) of the rotations from the true to the fitted joint: 0 when
    the fits err in no common direction, whatever their error per sample."""
    fitted, true = (roma.rotvec_to_rotmat(p.reshape(p.shape[0], -1, 3)) for p in (pose, truth))
    mean = roma.special_procrustes((true.transpose(-1, -2) @ fitted).mean(dim=0))
    return torch.rad2deg(roma.rotmat_to_rotvec(mean).norm(dim=-1))


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int | None = 255) -> np.ndarray:
    """(H, W) predicted and true labels -> (C, C) pixel counts, rows = truth, columns = prediction.
    Pixels whose truth is `ignore` are left out; any other label outside 0..C-1 is an error."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    gt = np.asarray(gt).astype(np.int64).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"label maps differ in size: {pred.shape} vs {gt.shape}")
    keep = gt != ignore if ignore is not None else np.ones_like(gt, dtype=bool)
    pred, gt = pred[keep], gt[keep]
    if len(gt) and (gt.min() < 0 or gt.max() >= num_classes or pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray, ignored: int = 0, ignored_background: int = 0) -> dict[str, float]:
    """(C, C) confusion -> accuracy and macro F1 (the mean over classes of 2TP / (2TP + FP + FN);
    a class absent from both truth and prediction is left out of the mean). `ignored` pixels (truth
    255, left out of the confusion) count as background for the accuracy, as SPIN and UP-3D count
    them: `ignored_background` of them were predicted background."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.full_like(tp, np.nan), where=denom > 0)
    total = confusion.sum() + ignored
    return {
        "accuracy": float((tp.sum() + ignored_background) / total) if total else float("nan"),
        "f1": float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
    }


def summarize(values: dict[str, np.ndarray | torch.Tensor]) -> dict[str, float]:
    """Per-sample arrays -> their means as floats (JSON-able); empty arrays give NaN."""
    out = {}
    for name, v in values.items():
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[name] = float(np.mean(v)) if v.size else float("nan")
    return out
