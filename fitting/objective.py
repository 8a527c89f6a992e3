"""SMPLify's energy terms as pure functions, in SPIN's units (pixels of a 224-px crop, focal
length 5000, principal point at the crop centre).

Every term comes as residuals r (the energy is sum(r**2)) so that gradient solvers and
least-squares solvers share one objective, plus the per-joint data term that SPIN reports.
"""
from __future__ import annotations

import torch

from fitting.camera import perspective_projection
from fitting.keypoints import FIT_IGNORED, GT_TORSO, NUM_KEYPOINTS, OP_TORSO
from fitting.priors import GMMPrior, angle_prior, angle_prior_residuals, shape_prior


def gmof(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Geman-McClure: sigma^2 x^2 / (sigma^2 + x^2), elementwise."""
    x2 = x.square()
    return sigma ** 2 * x2 / (sigma ** 2 + x2)


def gmof_residual(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Signed square root of gmof: sigma x / sqrt(sigma^2 + x^2), elementwise."""
    return sigma * x / torch.sqrt(sigma ** 2 + x.square())


def fit_confidence(confidence: torch.Tensor) -> torch.Tensor:
    """(B, 49) keypoint confidence -> a new (B, 49) with SPIN's FIT_IGNORED keypoints at 0."""
    keep = torch.ones(NUM_KEYPOINTS, dtype=confidence.dtype, device=confidence.device)
    keep[list(FIT_IGNORED)] = 0.0
    return confidence * keep


def reprojection_residuals(projected: torch.Tensor, keypoints: torch.Tensor, confidence: torch.Tensor,
                           sigma: float) -> torch.Tensor:
    """(B, N, 2) projections, (B, N, 3) keypoints (pixels), (B, N) confidence -> (B, N, 2)
    conf * gmof_residual; squared and summed over xy it is conf^2 * sum_xy gmof."""
    return confidence[..., None] * gmof_residual(projected - keypoints[..., :2], sigma)


def reprojection_loss(projected: torch.Tensor, keypoints: torch.Tensor, confidence: torch.Tensor,
                      sigma: float) -> torch.Tensor:
    """(B, N) per-joint data term conf^2 * sum_xy gmof(proj - kp, sigma) (SPIN's 'reprojection')."""
    return confidence.square() * gmof(projected - keypoints[..., :2], sigma).sum(dim=-1)


def torso_residuals(projected: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """(B, 49, 2), (B, 49, 3) -> (B, 4, 2) plain torso differences of SMPLify's camera stage.

    OpenPose's hips and shoulders where all four are detected, otherwise the ground-truth
    convention's; a ground-truth torso joint that is not detected (conf 0) is left out rather
    than pulled towards its placeholder coordinates."""
    op, gt = list(OP_TORSO), list(GT_TORSO)
    use_op = (keypoints[:, op, 2] > 0).all(dim=1)[:, None, None]
    diff_op = projected[:, op] - keypoints[:, op, :2]
    diff_gt = (projected[:, gt] - keypoints[:, gt, :2]) * (keypoints[:, gt, 2:] > 0)
    return torch.where(use_op, diff_op, diff_gt)


def camera_residuals(model_keypoints: torch.Tensor, cam_t: torch.Tensor, cam_t_init: torch.Tensor,
                     keypoints: torch.Tensor, depth_weight: float, focal_length: float,
                     img_res: int) -> torch.Tensor:
    """Camera stage: (B, 49, 3) model keypoints, (B, 3) cam_t and its initial estimate,
    (B, 49, 3) keypoints in pixels -> (B, 9) residuals: 8 torso coordinates and the depth anchor
    depth_weight * (t_z - t_z_init)."""
    projected = perspective_projection(model_keypoints, cam_t, focal_length, img_res=img_res)
    torso = torso_residuals(projected, keypoints).flatten(1)
    depth = depth_weight * (cam_t[:, 2:] - cam_t_init[:, 2:])
    return torch.cat([torso, depth], dim=1)


def body_residuals(model_keypoints: torch.Tensor, body_pose: torch.Tensor, betas: torch.Tensor,
                   cam_t: torch.Tensor, keypoints: torch.Tensor, confidence: torch.Tensor,
                   prior: GMMPrior, sigma: float, pose_prior_weight: float, angle_prior_weight: float,
                   shape_prior_weight: float, focal_length: float, img_res: int) -> torch.Tensor:
    """Body stage: -> (B, 98 + 70 + 4 + 10) residuals whose squared sum is SMPLify's energy

        sum_j conf_j^2 sum_xy gmof + w_pose^2 gmm(body_pose) + w_angle^2 sum exp(+-theta)^2
        + w_shape^2 ||betas||^2.

    `confidence` (B, 49) is the fitting confidence (see fit_confidence)."""
    projected = perspective_projection(model_keypoints, cam_t, focal_length, img_res=img_res)
    data = reprojection_residuals(projected, keypoints, confidence, sigma).flatten(1)
    return torch.cat([
        data,
        pose_prior_weight * prior.residuals(body_pose),
        angle_prior_weight * angle_prior_residuals(body_pose),
        shape_prior_weight * betas,
    ], dim=1)


def body_energy_terms(model_keypoints: torch.Tensor, body_pose: torch.Tensor, betas: torch.Tensor,
                      cam_t: torch.Tensor, keypoints: torch.Tensor, confidence: torch.Tensor,
                      prior: GMMPrior, sigma: float, pose_prior_weight: float, angle_prior_weight: float,
                      shape_prior_weight: float, focal_length: float, img_res: int) -> dict[str, torch.Tensor]:
    """The body-stage energy split per term, each (B,), computed directly (not from residuals)."""
    projected = perspective_projection(model_keypoints, cam_t, focal_length, img_res=img_res)
    return {
        "data": reprojection_loss(projected, keypoints, confidence, sigma).sum(dim=-1),
        "pose_prior": pose_prior_weight ** 2 * prior(body_pose),
        "angle_prior": angle_prior_weight ** 2 * angle_prior(body_pose),
        "shape_prior": shape_prior_weight ** 2 * shape_prior(betas),
    }
