"""Gauss-Newton systems (J^T r, J^T J) of SMPLify's two stages, in closed form.

They linearize exactly the residuals of fitting.objective (the energies Adam minimises), with
the keypoints' Jacobian from fitting.keypoint_jacobian, the projection's and the robust loss's
derivatives by hand and the priors' Jacobians from their residual form: the GMM prior's is its
chosen component's whitening matrix (the component is held fixed within a step), the angle
prior's is diagonal, the shape prior's a scaled identity. Keypoints that the body stage always
ignores (FIT_IGNORED) are left out of the rows: their residuals are zero.
"""
from __future__ import annotations

from typing import Callable

import torch
from smplx.lbs import batch_rodrigues

from fitting.camera import pinhole
from fitting.keypoint_body import KeypointBody
from fitting.keypoint_jacobian import KeypointJacobian, skew
from fitting.keypoints import FIT_IGNORED, NUM_KEYPOINTS, NUM_SOURCE_JOINTS
from fitting.objective import camera_residuals, torso_residuals
from fitting.priors import ANGLE_PRIOR_INDICES, ANGLE_PRIOR_SIGNS, GMMPrior

Params = dict[str, torch.Tensor]
System = Callable[..., tuple[torch.Tensor, torch.Tensor]]
WIDTHS = {"global_orient": 3, "body_pose": 69, "betas": 10, "cam_t": 3}
LOCAL_ROTATIONS = ("global_orient",)


def _pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _offsets(free: tuple[str, ...]) -> dict[str, int]:
    out, at = {}, 0
    for name in free:
        out[name], at = at, at + WIDTHS[name]
    return out


def projection_rows(points: torch.Tensor, focal_length: float) -> torch.Tensor:
    """(B, N, 3) camera-frame points -> (B, N, 2, 3) d pixel / d point of the pinhole projection:
    f/z [1, 0, -x/z; 0, 1, -y/z]."""
    inv_z = 1.0 / points[..., 2]
    scale = focal_length * inv_z
    zero = torch.zeros_like(scale)
    x, y = points[..., 0] * inv_z, points[..., 1] * inv_z
    return torch.stack([scale, zero, -scale * x, zero, scale, -scale * y], dim=-1).unflatten(-1, (2, 3))


def _normal(jac: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, M, n), (R, M) -> J^T r (R, n), J^T J (R, n, n)."""
    return (jac * res[..., None]).sum(dim=1), jac.mT @ jac


def _add_priors(gradient: torch.Tensor, hessian: torch.Tensor, params: Params, offsets: dict[str, int],
               prior: GMMPrior, precisions: torch.Tensor, pose_weight: float, angle_weight: float,
               shape_weight: float) -> None:
    """Add the body stage's prior terms to J^T r (R, n) and J^T J (R, n, n), in place (both are
    this function's own fresh tensors). `precisions` (K, 69, 69): each component's F^T F."""
    if "body_pose" in offsets:
        at, pose = offsets["body_pose"], params["body_pose"]
        best = prior.component_energies(pose).argmin(dim=1)
        block = pose_weight ** 2 * precisions.index_select(0, best)
        span = slice(at, at + pose.shape[1])
        hessian[:, span, span] += block
        gradient[:, span] += (block * (pose - prior.means.index_select(0, best))[:, None]).sum(-1)
        index = torch.as_tensor(ANGLE_PRIOR_INDICES, device=pose.device)
        signs = torch.as_tensor(ANGLE_PRIOR_SIGNS, dtype=pose.dtype, device=pose.device)
        angle = angle_weight * torch.exp(pose[:, index] * signs)          # the residuals
        columns = at + index
        hessian[:, columns, columns] += angle.square()
        gradient[:, columns] += signs * angle.square()
    if "betas" in offsets:
        at, betas = offsets["betas"], params["betas"]
        span = range(at, at + betas.shape[1])
        hessian[:, span, span] += shape_weight ** 2
        gradient[:, at:at + betas.shape[1]] += shape_weight ** 2 * betas


def body_system(body: KeypointBody, prior: GMMPrior, keypoints: torch.Tensor, confidence: torch.Tensor,
                free: tuple[str, ...], sigma: float, pose_prior_weight: float, angle_prior_weight: float,
                shape_prior_weight: float, focal_length: float, img_res: int) -> System:
    """The body stage's system (params, rows=None) -> (J^T r, J^T J) over `free`, for
    (B, 49, 3) keypoints in pixels and (B, 49) fitting confidence (see body_residuals)."""
    fitted = [k for k in range(NUM_KEYPOINTS) if k not in FIT_IGNORED]
    jacobian = KeypointJacobian(body, fitted)
    target, weight = keypoints[:, fitted, :2], confidence[:, fitted]
    precisions = prior.factors.mT @ prior.factors
    offsets = _offsets(free)

    def system(params: Params, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pose = torch.cat([params["global_orient"], params["body_pose"]], dim=1)
        lin = jacobian(pose, params["betas"], local_root=True)
        points = lin.keypoints + params["cam_t"][:, None]
        pixels = pinhole(points, focal_length, img_res / 2.0)
        diff = pixels - _pick(target, rows)
        root = torch.sqrt(sigma ** 2 + diff.square())
        conf = _pick(weight, rows)[..., None]
        res = conf * sigma * diff / root                                   # gmof_residual
        slope = conf * sigma ** 3 / (root * root.square())                 # its derivative
        rows_d = slope[..., None] * projection_rows(points, focal_length)  # (R, K, 2, 3)
        blocks = {"cam_t": rows_d}
        if "global_orient" in free or "body_pose" in free:
            pulled = lin.pull(rows_d)
            blocks["global_orient"], blocks["body_pose"] = pulled[..., :3], pulled[..., 3:]
        if "betas" in free:
            blocks["betas"] = sum(rows_d[..., x, None] * lin.d_betas[:, :, None, x] for x in range(3))
        jac = torch.cat([blocks[name] for name in free], dim=-1).flatten(1, 2)
        gradient, hessian = _normal(jac, res.flatten(1))
        _add_priors(gradient, hessian, params, offsets, prior, precisions, pose_prior_weight,
                   angle_prior_weight, shape_prior_weight)
        return gradient, hessian
    return system


def camera_system(body: KeypointBody, keypoints: torch.Tensor, cam_t_init: torch.Tensor, params: Params,
                  free: tuple[str, ...], depth_weight: float, focal_length: float, img_res: int) -> System | None:
    """The camera stage's system over `free` ⊆ {global_orient, cam_t} with the body pose and
    shape of `params` held fixed: the body turns rigidly about its root joint, keypoint k as
    R (local_k) + mass_k root (see rigid_keypoints). None for other free sets."""
    if not set(free) <= {"global_orient", "cam_t"}:
        return None
    with torch.no_grad():
        zero = torch.zeros_like(params["body_pose"][:, :3])
        rest = body(torch.cat([zero, params["body_pose"]], dim=1), params["betas"])
        root = body.joint_template[0] + params["betas"] @ body.joint_shapedirs[0].T
        # Each keypoint's regressor weight: 1 for joints and vertices, the row sum for extra rows.
        kinematic = torch.ones(NUM_SOURCE_JOINTS - body.extra.shape[0], dtype=rest.dtype, device=rest.device)
        mass = torch.cat([kinematic, body.extra.sum(dim=1)])[body.keypoint_source]
        anchor = mass[None, :, None] * root[:, None, :]
        local = rest - anchor
    # Torso residuals are plain differences chosen per sample by the keypoints' confidence:
    # linear in the projections, so the selection of a derivative is the derivative.
    zeroed = torch.cat([torch.zeros_like(keypoints[..., :2]), keypoints[..., 2:]], dim=-1)
    offsets = _offsets(free)
    width = sum(WIDTHS[name] for name in free)

    def system(p: Params, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        orient = p["global_orient"]
        turned = (batch_rodrigues(orient) @ _pick(local, rows).mT).mT
        points3d = turned + _pick(anchor, rows)
        res = camera_residuals(points3d, p["cam_t"], _pick(cam_t_init, rows), _pick(keypoints, rows),
                               depth_weight, focal_length, img_res)
        d_pixels = projection_rows(points3d + p["cam_t"][:, None], focal_length)   # (R, 49, 2, 3)
        columns = []
        for name in free:
            if name == "cam_t":
                columns.append(d_pixels)
            else:
                # d point / d increment[c] = e_c x (R local) = -[R local] e_c
                columns.append(d_pixels @ -skew(turned))
        d_all = torch.cat(columns, dim=-1)                                         # (R, 49, 2, n)
        count = d_all.shape[0]
        folded = d_all.permute(0, 3, 1, 2).reshape(count * width, NUM_KEYPOINTS, 2)
        torso = torso_residuals(folded, _pick(zeroed, rows).repeat_interleave(width, dim=0))
        jac = torso.reshape(count, width, -1).mT                                   # (R, 8, n)
        depth = torch.zeros(count, 1, width, dtype=jac.dtype, device=jac.device)
        if "cam_t" in offsets:
            depth[..., offsets["cam_t"] + 2] = depth_weight
        return _normal(torch.cat([jac, depth], dim=1), res)
    return system
