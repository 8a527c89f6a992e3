"""SPIN's training losses, per sample and per term.

Every term is a (B,) tensor of unweighted per-sample values plus a (B,) mask of the samples it
covers; the batch value of a term is its mean over the covered samples (SPIN averages the
keypoint and camera terms over the batch and the pose, betas, mesh and 3D terms over the
samples that have such targets). The total is
    scale * sum_t weight_t * batch_value_t
with SPIN's weights: keypoints 5, 3D keypoints 5, pose 1, betas 0.001, vertices 0 (SPIN's
`shape_loss_weight`), camera 1, and the overall factor 60 (so the camera term weighs 60).

The 2D-only mode adds priors on the prediction in place of fits (the HMR-style baseline):
SMPLify's GMM pose prior, angle prior and shape prior, weighted relative to the keypoint term as
SMPLify weighs them against its pixel-space data term: SPIN's final SMPLify weights (4.78^2,
15.2^2, 5^2) divided by the 98 * 112^2 that turns the normalized keypoint MSE into SMPLify's
summed squared pixel error, times the keypoint weight. Because the priors follow the keypoint
weight, that weight only sets the balance between the 2D term and the fits' pose and shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fitting.camera import IMG_RES, perspective_projection, pixels_to_normalized
from fitting.errors import BadInput
from fitting.geometry import pose_to_rotmat, rotmat_to_pose
from fitting.keypoints import GT24, OP25
from fitting.priors import angle_prior, shape_prior
from fitting.settings import Settings
from trainer.model import RegressorOutput, cam_translation

MODES = ("fits", "2d")
_SMPLIFY_TO_NORMALIZED = 1.0 / (98 * 112.0 ** 2)


@dataclass
class LossWeights(Settings):
    SECTION = "weights"

    keypoints: float = 5.0       # 2D reprojection of the 49 keypoints
    keypoints_3d: float = 5.0    # 3D joints, where a sample has them
    pose: float = 1.0            # SMPL rotation matrices of the valid fits
    betas: float = 0.001         # shape of the valid fits
    vertices: float = 0.0        # L1 on the mesh (SPIN trains without it)
    cam: float = 1.0             # keeps the weak-perspective scale positive
    scale: float = 60.0          # on the weighted sum, as SPIN scales its loss
    openpose: float = 0.0        # confidence factor of the OpenPose block (SPIN trains on the GT block)
    gt_keypoints: float = 1.0    # confidence factor of the ground-truth block
    pose_prior: float = 4.78 ** 2 * _SMPLIFY_TO_NORMALIZED   # 2D-only mode, times `keypoints`
    angle_prior: float = 15.2 ** 2 * _SMPLIFY_TO_NORMALIZED
    shape_prior: float = 5.0 ** 2 * _SMPLIFY_TO_NORMALIZED

    def __post_init__(self) -> None:
        negative = [k for k, v in asdict(self).items() if v < 0]
        if negative:
            raise BadInput(f"loss weights must be >= 0: {negative}")


@dataclass
class LossResult:
    total: torch.Tensor                 # scalar, for backward()
    terms: dict[str, torch.Tensor]      # name -> (B,) unweighted per-sample values
    masks: dict[str, torch.Tensor]      # name -> (B,) bool, samples the term covers
    keypoint_per_joint: torch.Tensor    # (B, 49) per-joint reprojection error

    def batch_values(self) -> dict[str, float]:
        """Each term's batch value (mean over its covered samples), for logging."""
        return {name: float(masked_mean(v.detach(), self.masks[name])) for name, v in self.terms.items()}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) values, (B,) bool mask -> mean over the masked samples (0 when there are none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def project_keypoints(points: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) model keypoints, (B, 3) weak-perspective camera -> (B, N, 2) normalized crop
    coordinates, through SPIN's perspective camera (5000 px focal length, 224-px crop)."""
    pixels = perspective_projection(points, cam_translation(cam))
    return pixels_to_normalized(pixels, IMG_RES)


def keypoint_loss(pred: torch.Tensor, target: torch.Tensor, openpose_weight: float = 0.0,
                  gt_weight: float = 1.0) -> torch.Tensor:
    """(B, 49, 2) predicted and (B, 49, 3) target normalized keypoints (+ confidence) ->
    (B, 49) confidence-weighted squared error, averaged over x and y."""
    conf = target[..., 2].clone()
    conf[:, list(OP25)] *= openpose_weight
    conf[:, list(GT24)] *= gt_weight
    return conf * (pred - target[..., :2]).square().mean(dim=-1)


def keypoint_3d_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 24, 3) predicted and (B, 24, 4) target ground-truth-convention joints, each centred
    on the mid-hips (rows 2 and 3) -> (B,) confidence-weighted squared error."""
    pred = pred - 0.5 * (pred[:, 2:3] + pred[:, 3:4])
    gt = target[..., :3] - 0.5 * (target[:, 2:3, :3] + target[:, 3:4, :3])
    return (target[..., 3:] * (pred - gt).square()).mean(dim=(1, 2))


def pose_loss(pred_rotmat: torch.Tensor, target_rotmat: torch.Tensor) -> torch.Tensor:
    """(B, 24, 3, 3) each -> (B,) squared error of the rotation matrices."""
    return (pred_rotmat - target_rotmat).square().mean(dim=(1, 2, 3))


def betas_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 10) each -> (B,) squared error."""
    return (pred - target).square().mean(dim=-1)


def vertex_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) each -> (B,) mean absolute error (SPIN's L1 shape loss)."""
    return (pred - target).abs().mean(dim=(1, 2))


def camera_loss(cam: torch.Tensor) -> torch.Tensor:
    """(B, 3) weak-perspective camera -> (B,) exp(-10 s)^2: keeps the scale positive."""
    return torch.exp(-10.0 * cam[:, 0]).square()


def compute_losses(
    out: RegressorOutput,
    batch: dict[str, torch.Tensor],
    body_model: torch.nn.Module,
    weights: LossWeights,
    mode: str = "fits",
    prior: torch.nn.Module | None = None,
) -> LossResult:
    """All of SPIN's terms for one batch (see the module docstring).

    batch: keypoints (B, 49, 3), pose (B, 72), betas (B, 10), fit_valid (B,), betas_ok (B,),
    joints3d (B, 24, 4), has_joints3d (B,), usable (B,), as `trainer.dataset` serves them.
    """
    if mode not in MODES:
        raise BadInput(f"unknown training mode '{mode}' (choose from {', '.join(MODES)})")
    usable = batch["usable"].bool()
    body = body_model(out.rotmat, out.betas)
    pred_2d = project_keypoints(body.keypoints, out.cam)
    per_joint = keypoint_loss(pred_2d, batch["keypoints"], weights.openpose, weights.gt_keypoints)

    # SPIN's shape guard, as its train/trainer.py does it: a fit with any |beta| > 3 gets the mean
    # shape (0) as its betas target; its pose, and its vertices (from its own betas), still
    # supervise when the fit is valid. An invalid fit supervises none of them. (The keypoint
    # losses use the dataset's labels, not the fit, and apply to every sample; SPIN puts no loss
    # on a fit's joints, so neither does this.)
    fit_mask = batch["fit_valid"].bool() & usable
    betas_target = torch.where(batch["betas_ok"].bool()[:, None], batch["betas"], torch.zeros_like(batch["betas"]))
    terms = {
        "keypoints": per_joint.mean(dim=-1),
        "keypoints_3d": keypoint_3d_loss(body.keypoints[:, list(GT24)], batch["joints3d"]),
        "pose": pose_loss(out.rotmat, pose_to_rotmat(batch["pose"])),
        "betas": betas_loss(out.betas, betas_target),
        "cam": camera_loss(out.cam),
    }
    masks = {
        "keypoints": usable,
        "keypoints_3d": batch["has_joints3d"].bool() & usable,
        "pose": fit_mask,
        "betas": fit_mask,
        "cam": usable,
    }
    if weights.vertices > 0:
        with torch.no_grad():
            target = body_model(batch["pose"], batch["betas"]).vertices
        terms["vertices"] = vertex_loss(body.vertices, target)
        masks["vertices"] = fit_mask
    if mode == "2d":
        if prior is None:
            raise BadInput("the 2D-only mode needs a pose prior")
        body_pose = rotmat_to_pose(out.rotmat)[:, 3:]
        terms["pose_prior"] = prior(body_pose)
        terms["angle_prior"] = angle_prior(body_pose)
        terms["shape_prior"] = shape_prior(out.betas)
        for name in ("pose_prior", "angle_prior", "shape_prior"):
            masks[name] = usable
    factors = {name: weights.keypoints for name in ("pose_prior", "angle_prior", "shape_prior")}
    total = sum(factors.get(name, 1.0) * getattr(weights, name) * masked_mean(terms[name], masks[name])
                for name in terms)
    return LossResult(total=weights.scale * total, terms=terms, masks=masks, keypoint_per_joint=per_joint)
