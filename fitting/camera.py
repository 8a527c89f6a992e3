"""SPIN's camera: a perspective camera looking down +z, focal length 5000 px, principal point at
the centre of a 224-px crop, translation in camera space. Also the weak-perspective camera that
the regressor predicts and a batched camera-translation estimate from 2D keypoints.

All functions are pure and batched; shapes are given as (B, ...). `pinhole` is the projection
itself, for torch tensors and numpy arrays alike (the renderer and the benchmark work in numpy).
"""
from __future__ import annotations

import numpy as np
import torch

FOCAL_LENGTH = 5000.0
IMG_RES = 224


def pinhole(points, focal_length, center):
    """(..., 3) camera-frame points -> (..., 2) pixels f (x, y) / z + center; torch or numpy.
    focal_length and center broadcast against the points (a scalar, (2,), (B, 1, 2), ...)."""
    return focal_length * points[..., :2] / points[..., 2:3] + center


def perspective_projection(
    points: torch.Tensor,
    translation: torch.Tensor,
    focal_length: float | torch.Tensor = FOCAL_LENGTH,
    camera_center: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    img_res: int = IMG_RES,
) -> torch.Tensor:
    """Project camera-frame points to pixels.

    points: (B, N, 3); translation: (B, 3); focal_length: scalar or (B,);
    camera_center: (B, 2), default the crop centre (img_res / 2); rotation: (B, 3, 3), default I.
    Returns (B, N, 2) pixel coordinates in the crop.
    """
    if rotation is not None:
        points = torch.einsum("bij,bnj->bni", rotation, points)
    points = points + translation[:, None, :]
    focal = torch.as_tensor(focal_length, dtype=points.dtype, device=points.device)
    focal = focal.reshape(-1, 1, 1) if focal.ndim else focal
    if camera_center is None:
        center = points.new_full((1, 1, 2), img_res / 2.0)
    else:
        center = camera_center[:, None, :]
    return pinhole(points, focal, center)


def crop_camera(size: int) -> tuple[float, np.ndarray]:
    """SPIN's camera (focal 5000 px for a 224-px crop, principal point at the centre) for a stored
    crop of `size` pixels: (focal, (2,) principal point)."""
    return FOCAL_LENGTH * size / IMG_RES, np.array([size / 2.0, size / 2.0])


def weak_perspective_to_translation(
    cam: torch.Tensor, focal_length: float = FOCAL_LENGTH, img_res: int = IMG_RES
) -> torch.Tensor:
    """(B, 3) weak-perspective [s, tx, ty] (normalized crop coordinates) -> (B, 3) camera translation."""
    depth = 2.0 * focal_length / (img_res * cam[:, 0] + 1e-9)
    return torch.stack([cam[:, 1], cam[:, 2], depth], dim=-1)


def translation_to_weak_perspective(
    cam_t: torch.Tensor, focal_length: float = FOCAL_LENGTH, img_res: int = IMG_RES
) -> torch.Tensor:
    """(B, 3) camera translation -> (B, 3) weak-perspective [s, tx, ty]; inverse of the above."""
    scale = 2.0 * focal_length / (img_res * cam_t[:, 2])
    return torch.stack([scale, cam_t[:, 0], cam_t[:, 1]], dim=-1)


def normalized_to_pixels(keypoints: torch.Tensor, img_res: int = IMG_RES) -> torch.Tensor:
    """(..., 2+) keypoints in [-1, 1] crop coordinates -> crop pixels (extra columns kept)."""
    xy = (keypoints[..., :2] + 1.0) * (img_res / 2.0)
    return torch.cat([xy, keypoints[..., 2:]], dim=-1)


def pixels_to_normalized(keypoints: torch.Tensor, img_res: int = IMG_RES) -> torch.Tensor:
    """(..., 2+) crop pixels -> [-1, 1] crop coordinates (extra columns kept)."""
    xy = keypoints[..., :2] / (img_res / 2.0) - 1.0
    return torch.cat([xy, keypoints[..., 2:]], dim=-1)


def estimate_translation(
    joints3d: torch.Tensor,
    keypoints2d: torch.Tensor,
    focal_length: float = FOCAL_LENGTH,
    img_res: int = IMG_RES,
    min_depth: float = 0.5,
) -> torch.Tensor:
    """Camera translation that best aligns 3D joints to 2D keypoints, batched weighted least squares.

    Solves, for every sample at once, the linear system of SPIN's `estimate_translation_np`
    (x_ij * (Z_j + t_z) = f * (X_j + t_x), the same for y), weighted by confidence.

    joints3d: (B, N, 3) model joints without translation; keypoints2d: (B, N, 3) crop pixels and
    confidence. Returns (B, 3). Samples with fewer than two confident keypoints get a default
    depth in front of the camera.
    """
    dtype = torch.float64  # normal equations are badly scaled in float32
    X = joints3d.to(dtype)
    uv = keypoints2d[..., :2].to(dtype) - img_res / 2.0
    weight = keypoints2d[..., 2].to(dtype).clamp(min=0.0).sqrt()
    weight = torch.where(torch.isfinite(weight) & torch.isfinite(uv).all(-1), weight, 0.0)
    uv = torch.nan_to_num(uv)
    f = float(focal_length)
    ones = torch.ones_like(uv[..., 0])
    zeros = torch.zeros_like(ones)
    # rows for x and y: [f, 0, -u] t = u Z - f X ; [0, f, -v] t = v Z - f Y
    rows_x = torch.stack([f * ones, zeros, -uv[..., 0]], dim=-1)
    rows_y = torch.stack([zeros, f * ones, -uv[..., 1]], dim=-1)
    rhs_x = uv[..., 0] * X[..., 2] - f * X[..., 0]
    rhs_y = uv[..., 1] * X[..., 2] - f * X[..., 1]
    A = torch.cat([rows_x, rows_y], dim=1) * torch.cat([weight, weight], dim=1)[..., None]
    b = torch.cat([rhs_x, rhs_y], dim=1) * torch.cat([weight, weight], dim=1)
    AtA = A.transpose(1, 2) @ A + 1e-9 * torch.eye(3, dtype=dtype, device=A.device)
    Atb = (A.transpose(1, 2) @ b[..., None])[..., 0]
    t = torch.linalg.solve(AtA, Atb)
    default = torch.tensor([0.0, 0.0, 2.0 * f / (img_res * 0.9)], dtype=dtype, device=t.device)
    enough = (weight > 0).sum(dim=1) >= 2
    ok = enough & torch.isfinite(t).all(-1) & (t[:, 2] > min_depth)
    return torch.where(ok[:, None], t, default).to(joints3d.dtype)
