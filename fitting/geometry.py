"""Rotations and alignment. Conversions come from roma; this module only adapts shapes.

Pose vectors are (B, 72) axis-angle, SMPL's layout: global orientation then 23 body joints.
"""
from __future__ import annotations

import roma
import torch


def pose_to_rotmat(pose: torch.Tensor) -> torch.Tensor:
    """(B, 24*3) axis-angle -> (B, 24, 3, 3) rotation matrices."""
    return roma.rotvec_to_rotmat(pose.reshape(pose.shape[0], -1, 3))


def rotmat_to_pose(rotmat: torch.Tensor) -> torch.Tensor:
    """(B, J, 3, 3) rotation matrices -> (B, J*3) axis-angle."""
    return roma.rotmat_to_rotvec(rotmat).reshape(rotmat.shape[0], -1)


def sixd_to_rotmat(sixd: torch.Tensor) -> torch.Tensor:
    """(..., 6) Zhou et al.'s 6D representation (two columns, SPIN's layout) -> (..., 3, 3).

    SPIN reshapes the 6 numbers as a 3x2 matrix whose columns are the two basis vectors.
    """
    return roma.special_gramschmidt(sixd.reshape(*sixd.shape[:-1], 3, 2))


def rotmat_to_sixd(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 6): the first two columns, in the layout `sixd_to_rotmat` reads."""
    return rotmat[..., :, :2].reshape(*rotmat.shape[:-2], 6)


def similarity_align(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Procrustes with scale: `source` (B, N, 3) moved onto `target` (B, N, 3) by the similarity
    transform that minimizes the (B, N) `weights`-weighted squared distances (all 1 by default).
    Returns the aligned source (B, N, 3)."""
    R, t, s = roma.rigid_points_registration(source, target, weights=weights, compute_scaling=True)
    return s[:, None, None] * torch.einsum("bij,bnj->bni", R, source) + t[:, None, :]
