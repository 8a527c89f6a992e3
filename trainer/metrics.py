"""Evaluation metrics as pure functions.

3D: SPIN's protocol on the 14 LSP joints (the first 14 of the ground-truth block), both sets
centred on their pelvis (the mid-point of the hips) and compared in millimetres:
    MPJPE      mean per-joint position error
    PA-MPJPE   the same after the best similarity transform (Procrustes; SPIN's
               "reconstruction error")
    PCK / AUC  MPI-INF-3DHP's: the percentage of joints within 150 mm, and the mean of that share over
               the thresholds 0, 5, ..., 150 mm; without and with the alignment
Segmentation: accuracy and macro F1 from a confusion matrix accumulated over the whole test set,
as SPIN (after UP-3D) evaluates LSP: foreground/background (2 classes) and the six parts plus
background (7 classes).
"""
from __future__ import annotations

import numpy as np
import torch

from fitting.geometry import similarity_align

LSP_RIGHT_HIP, LSP_LEFT_HIP = 2, 3
PCK_THRESHOLD_MM = 150.0
AUC_THRESHOLDS_MM = tuple(float(t) for t in np.linspace(0.0, 150.0, 31))


def centre_on_pelvis(joints: torch.Tensor) -> torch.Tensor:
    """(B, 14, 3) LSP joints -> the same minus the mid-hip point."""
    return joints - 0.5 * (joints[:, LSP_RIGHT_HIP:LSP_RIGHT_HIP + 1] + joints[:, LSP_LEFT_HIP:LSP_LEFT_HIP + 1])


def joint_errors(pred: torch.Tensor, gt: torch.Tensor, align: bool = False) -> torch.Tensor:
    """(B, 14, 3) predicted and true LSP joints in metres -> (B, 14) distances in mm, after
    pelvis centring and, with `align`, the best similarity transform of pred onto gt."""
    pred = centre_on_pelvis(pred.double())
    gt = centre_on_pelvis(gt.double())
    if align:
        pred = similarity_align(pred, gt)
    return 1000.0 * (pred - gt).norm(dim=-1)


def mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B,) mean per-joint position error in mm."""
    return joint_errors(pred, gt).mean(dim=-1)


def pa_mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B,) reconstruction error: MPJPE after Procrustes alignment, in mm."""
    return joint_errors(pred, gt, align=True).mean(dim=-1)


def pck(errors: torch.Tensor, threshold: float = PCK_THRESHOLD_MM) -> torch.Tensor:
    """(B, J) joint errors in mm -> (B,) percentage of joints within `threshold`."""
    return 100.0 * (errors <= threshold).double().mean(dim=-1)


def auc(errors: torch.Tensor, thresholds: tuple[float, ...] = AUC_THRESHOLDS_MM) -> torch.Tensor:
    """(B, J) joint errors in mm -> (B,) mean PCK (%) over `thresholds`."""
    return torch.stack([pck(errors, t) for t in thresholds], dim=-1).mean(dim=-1)


def pose_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 14, 3) each, metres -> per-sample (B,) mpjpe, pa_mpjpe (mm), pck, auc, pa_pck, pa_auc (%)."""
    raw = joint_errors(pred, gt)
    aligned = joint_errors(pred, gt, align=True)
    return {
        "mpjpe": raw.mean(dim=-1), "pa_mpjpe": aligned.mean(dim=-1),
        "pck": pck(raw), "auc": auc(raw), "pa_pck": pck(aligned), "pa_auc": auc(aligned),
    }


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


def segmentation_scores(confusion: np.ndarray) -> dict[str, float]:
    """(C, C) confusion -> accuracy and macro F1 (the mean over classes of 2TP / (2TP + FP + FN);
    a class absent from both truth and prediction is left out of the mean)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.full_like(tp, np.nan), where=denom > 0)
    total = confusion.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "f1": float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
    }


def summarize(values: dict[str, np.ndarray | torch.Tensor]) -> dict[str, float]:
    """Per-sample arrays -> their means as floats (JSON-able); empty arrays give NaN."""
    out = {}
    for name, v in values.items():
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[name] = float(np.mean(v)) if v.size else float("nan")
    return out
