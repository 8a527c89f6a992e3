"""Rotations, SPIN's camera and Procrustes alignment, checked against known values."""
from __future__ import annotations

import math

import pytest
import roma
import torch

from fitting.camera import (
    FOCAL_LENGTH,
    IMG_RES,
    estimate_translation,
    normalized_to_pixels,
    perspective_projection,
    pixels_to_normalized,
    translation_to_weak_perspective,
    weak_perspective_to_translation,
)
from fitting.geometry import pose_to_rotmat, rotmat_to_pose, rotmat_to_sixd, similarity_align, sixd_to_rotmat


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_pose(batch: int, seed: int) -> torch.Tensor:
    """(B, 72) axis-angle with angles below pi (where axis-angle is unique)."""
    axis = torch.nn.functional.normalize(torch.randn(batch, 24, 3, generator=gen(seed), dtype=torch.float64), dim=-1)
    angle = torch.rand(batch, 24, 1, generator=gen(seed + 1), dtype=torch.float64) * 3.0
    return (axis * angle).reshape(batch, 72)


def test_axis_angle_rotmat_round_trip():
    pose = random_pose(5, 0)
    R = pose_to_rotmat(pose)
    assert R.shape == (5, 24, 3, 3)
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-10)
    assert torch.allclose(torch.linalg.det(R), torch.ones(5, 24, dtype=R.dtype), atol=1e-10)
    assert torch.allclose(rotmat_to_pose(R), pose, atol=1e-8)


def test_known_rotation():
    pose = torch.zeros(1, 72, dtype=torch.float64)
    pose[0, :3] = torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64)  # 90 degrees about z: x -> y
    R = pose_to_rotmat(pose)[0, 0]
    assert torch.allclose(R @ torch.tensor([1.0, 0.0, 0.0], dtype=R.dtype), torch.tensor([0.0, 1.0, 0.0], dtype=R.dtype), atol=1e-12)
    assert torch.allclose(pose_to_rotmat(torch.zeros(2, 72))[..., :, :], torch.eye(3).expand(2, 24, 3, 3))


def test_sixd_round_trip_and_layout():
    R = pose_to_rotmat(random_pose(4, 2))
    sixd = rotmat_to_sixd(R)
    assert sixd.shape == (4, 24, 6)
    assert torch.allclose(sixd_to_rotmat(sixd), R, atol=1e-10)
    # SPIN's layout: the 6 numbers are a 3x2 matrix, row-major, whose columns are the basis vectors
    identity = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    assert torch.allclose(sixd_to_rotmat(identity), torch.eye(3))
    assert torch.allclose(rotmat_to_sixd(torch.eye(3)), identity)


def test_sixd_of_any_vector_is_a_rotation():
    sixd = torch.randn(100, 6, generator=gen(3), dtype=torch.float64)
    R = sixd_to_rotmat(sixd)
    assert torch.allclose(R.transpose(-1, -2) @ R, torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-10)
    assert torch.allclose(torch.linalg.det(R), torch.ones(100, dtype=R.dtype), atol=1e-10)
    first = torch.nn.functional.normalize(sixd.reshape(100, 3, 2)[..., 0], dim=-1)
    assert torch.allclose(R[..., 0], first, atol=1e-10)  # Gram-Schmidt keeps the first column's direction


def test_projection_of_known_points():
    points = torch.tensor([[[0.1, -0.2, 10.0], [0.0, 0.0, 5.0]]])
    px = perspective_projection(points, torch.zeros(1, 3))
    c = IMG_RES / 2
    expected = torch.tensor([[[c + FOCAL_LENGTH * 0.01, c - FOCAL_LENGTH * 0.02], [c, c]]])
    assert torch.allclose(px, expected, atol=1e-4)
    # translation, focal, centre and rotation all enter
    px = perspective_projection(
        torch.tensor([[[1.0, 0.0, 0.0]]]), torch.tensor([[0.0, 0.0, 4.0]]), focal_length=100.0,
        camera_center=torch.tensor([[50.0, 60.0]]),
        rotation=roma.rotvec_to_rotmat(torch.tensor([[0.0, 0.0, math.pi / 2]])))
    assert torch.allclose(px, torch.tensor([[[50.0, 60.0 + 25.0]]]), atol=1e-4)


def test_weak_perspective_translation_round_trip():
    cam = torch.tensor([[0.9, 0.05, -0.1], [1.3, -0.2, 0.3]])
    cam_t = weak_perspective_to_translation(cam)
    assert cam_t[0, 2].item() == pytest.approx(2 * FOCAL_LENGTH / (IMG_RES * 0.9), rel=1e-6)
    assert torch.allclose(translation_to_weak_perspective(cam_t), cam, atol=1e-6)
    # a point at the body's origin lands where the weak-perspective camera puts it
    px = perspective_projection(torch.zeros(2, 1, 3), cam_t)
    normalized = pixels_to_normalized(px)
    assert torch.allclose(normalized[:, 0], cam[:, 0:1] * cam[:, 1:], atol=1e-5)


def test_normalized_pixels_round_trip():
    kp = torch.tensor([[-1.0, -1.0, 0.5], [0.0, 0.0, 1.0], [1.0, 0.5, 0.0]])
    px = normalized_to_pixels(kp)
    assert torch.allclose(px[:, :2], torch.tensor([[0.0, 0.0], [112.0, 112.0], [224.0, 168.0]]))
    assert torch.allclose(px[:, 2], kp[:, 2]) and torch.allclose(pixels_to_normalized(px), kp)


def test_estimate_translation_recovers_known_translation():
    joints = 0.4 * torch.randn(6, 49, 3, generator=gen(4), dtype=torch.float64)
    t_true = torch.stack([0.3 * torch.randn(6, generator=gen(5), dtype=torch.float64),
                          0.3 * torch.randn(6, generator=gen(6), dtype=torch.float64),
                          30.0 + 30.0 * torch.rand(6, generator=gen(7), dtype=torch.float64)], -1)
    px = perspective_projection(joints, t_true)
    conf = torch.ones(6, 49, 1, dtype=torch.float64)
    conf[:, ::3] = 0.0                    # missing keypoints must not matter
    corrupt = px.clone()
    corrupt[:, ::3] = 1e4
    t = estimate_translation(joints, torch.cat([corrupt, conf], -1))
    assert torch.allclose(t, t_true, rtol=1e-6, atol=1e-6)


def test_estimate_translation_without_keypoints_gives_default_depth():
    joints = torch.randn(2, 49, 3, generator=gen(8))
    kp = torch.zeros(2, 49, 3)
    kp[1, :1, 2] = 1.0  # a single confident keypoint is not enough
    t = estimate_translation(joints, kp)
    assert torch.isfinite(t).all() and (t[:, 2] > 10).all()


def test_procrustes_of_a_similarity_copy_is_exact():
    source = torch.randn(3, 14, 3, generator=gen(9), dtype=torch.float64)
    R = roma.rotvec_to_rotmat(torch.randn(3, 3, generator=gen(10), dtype=torch.float64))
    scale = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)
    shift = torch.randn(3, 3, generator=gen(11), dtype=torch.float64)
    target = scale[:, None, None] * torch.einsum("bij,bnj->bni", R, source) + shift[:, None]
    aligned = similarity_align(source, target)
    assert (aligned - target).norm(dim=-1).max() < 1e-9
    # and a non-similar target is not matched exactly
    other = target + 0.1 * torch.randn(3, 14, 3, generator=gen(12), dtype=torch.float64)
    assert (similarity_align(source, other) - other).norm(dim=-1).mean() > 1e-3
