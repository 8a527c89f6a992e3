"""SPIN's training augmentation on the stored square crop: in-plane rotation, scale, horizontal
flip and per-channel colour noise, applied consistently to the image, the 2D keypoints, the
3D joints and the SMPL pose.

Order, as in SPIN: rotate (and scale) first, then flip. In normalized crop coordinates (x right,
y down, [-1, 1]) a keypoint u becomes
    u' = R(rot) u / scale,   then, if flipped,   u'' = (-u'_x, u'_y) with FLIP_PERM applied.
The camera frame has the same x and y axes (z forward), so the 3D counterpart is a rotation
Rz(rot) about the optical axis, applied to the global orientation, followed by the mirror
x -> -x, which is SMPL_FLIP_PERM on the joints with the y and z of every axis-angle negated.
Scale changes only the image (the regressor's camera absorbs it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import roma
import torch

from fitting.errors import BadInput
from fitting.keypoints import FLIP_PERM, GT24, SMPL_FLIP_PERM
from fitting.settings import Settings

# flip permutation of the 24 ground-truth joints (joints3d rows), from the 49-keypoint one
GT24_FLIP_PERM: tuple[int, ...] = tuple(FLIP_PERM[k] - GT24[0] for k in GT24)


@dataclass
class AugmentConfig(Settings):
    """SPIN's defaults: flip with p 0.5; rotation N(0, 30 deg) clipped at 2 sigma, applied with
    p 0.4; scale N(1, 0.25) clipped to [0.75, 1.25]; colour scale U(0.6, 1.4) per channel."""
    SECTION = "augment"

    flip_prob: float = 0.5
    rot_factor: float = 30.0
    rot_prob: float = 0.4
    scale_factor: float = 0.25
    noise_factor: float = 0.4


@dataclass(frozen=True)
class AugParams:
    flip: bool = False
    rot: float = 0.0      # degrees
    scale: float = 1.0    # > 1 zooms out (the crop covers more)
    pn: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel colour scale

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.rot == 0.0 and self.scale == 1.0 and self.pn == (1.0, 1.0, 1.0)


def sample_params(rng: np.random.Generator, config: AugmentConfig) -> AugParams:
    flip = bool(rng.uniform() < config.flip_prob)
    pn = tuple(float(v) for v in rng.uniform(1 - config.noise_factor, 1 + config.noise_factor, 3))
    rot = float(np.clip(rng.normal() * config.rot_factor, -2 * config.rot_factor, 2 * config.rot_factor))
    if rng.uniform() >= config.rot_prob:
        rot = 0.0
    scale = float(np.clip(rng.normal() * config.scale_factor + 1, 1 - config.scale_factor, 1 + config.scale_factor))
    return AugParams(flip=flip, rot=rot, scale=scale, pn=pn)


def rotation_z(degrees: float) -> np.ndarray:
    """(3, 3) rotation about the optical axis (z forward, x right, y down)."""
    return roma.rotvec_to_rotmat(torch.tensor([0.0, 0.0, math.radians(degrees)], dtype=torch.float64)).numpy()


def rotation_2d(degrees: float) -> np.ndarray:
    """(2, 2) rotation in image axes (x right, y down): `rotation_z` as the image sees it."""
    return rotation_z(degrees)[:2, :2]


def _crop_matrix(params: AugParams, size: int, img_res: int) -> np.ndarray:
    """(2, 3) map from output pixel centres to input pixel centres (cv2's inverse map)."""
    mirror = np.diag([-1.0, 1.0]) if params.flip else np.eye(2)
    A = params.scale * rotation_2d(params.rot).T @ mirror   # output -> input, normalized coords
    k = size / img_res
    linear = k * A
    offset = k * A @ np.full(2, 0.5) - (size / 2) * A @ np.ones(2) + (size / 2 - 0.5)
    return np.concatenate([linear, offset[:, None]], axis=1)


def augment_image(image: np.ndarray, params: AugParams, img_res: int) -> np.ndarray:
    """(S, S, 3) uint8 square crop -> (img_res, img_res, 3) uint8; outside the crop is black."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise BadInput(f"expected an HxWx3 image, got shape {image.shape}")
    if image.shape[0] != img_res or image.shape[1] != img_res:
        # area resampling first: the warp alone would alias when shrinking
        shrink = image.shape[0] > img_res
        image = cv2.resize(image, (img_res, img_res), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if params.flip or params.rot != 0.0 or params.scale != 1.0:
        matrix = _crop_matrix(params, img_res, img_res)
        image = cv2.warpAffine(image, matrix, (img_res, img_res), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    if params.pn != (1.0, 1.0, 1.0):
        image = np.clip(image.astype(np.float32) * np.asarray(params.pn, dtype=np.float32), 0, 255).astype(np.uint8)
    return image


def flip_keypoints(keypoints: np.ndarray, perm: tuple[int, ...] = FLIP_PERM) -> np.ndarray:
    """(K, C) keypoints (x first): mirror x and swap left and right."""
    out = keypoints[list(perm)].copy()
    out[:, 0] = -out[:, 0]
    return out


def augment_keypoints(keypoints: np.ndarray, params: AugParams) -> np.ndarray:
    """(49, 3) normalized keypoints with confidence -> the same after augmentation."""
    out = keypoints.astype(np.float64, copy=True)
    out[:, :2] = out[:, :2] @ rotation_2d(params.rot).T / params.scale
    if params.flip:
        out = flip_keypoints(out)
    return out.astype(keypoints.dtype)


def augment_joints3d(joints: np.ndarray, params: AugParams) -> np.ndarray:
    """(24, 4) ground-truth 3D joints (camera frame, + confidence) -> the same after augmentation."""
    out = joints.astype(np.float64, copy=True)
    out[:, :3] = out[:, :3] @ rotation_z(params.rot).T
    if params.flip:
        out = flip_keypoints(out, GT24_FLIP_PERM)
    return out.astype(joints.dtype)


def flip_pose(pose: np.ndarray) -> np.ndarray:
    """(72,) axis-angle pose of the mirrored body: joints swapped left/right, y and z negated."""
    out = pose.reshape(24, 3)[list(SMPL_FLIP_PERM)].copy()
    out[:, 1:] = -out[:, 1:]
    return out.reshape(72)


def rotate_global_orient(pose: np.ndarray, degrees: float) -> np.ndarray:
    """(72,) pose with its global orientation turned by Rz(degrees) in the camera frame."""
    out = np.array(pose, dtype=np.float64, copy=True)
    orient = roma.rotvec_to_rotmat(torch.from_numpy(out[:3]))
    out[:3] = roma.rotmat_to_rotvec(torch.from_numpy(rotation_z(degrees)) @ orient).numpy()
    return out.astype(pose.dtype)


def augment_pose(pose: np.ndarray, params: AugParams) -> np.ndarray:
    """(72,) axis-angle pose target -> the same after augmentation (rotate, then flip)."""
    out = rotate_global_orient(pose, params.rot) if params.rot != 0.0 else np.array(pose, copy=True)
    return flip_pose(out) if params.flip else out


def augment_translation(cam_t: np.ndarray, root: np.ndarray, params: AugParams) -> np.ndarray:
    """(3,) camera translation of a fit whose model root joint (rest pose, no translation) is
    `root` (3,) -> the translation that puts the augmented fit where the augmented keypoints are.

    SMPL rotates the body about its root, so turning the global orientation by Rz moves the
    root unless the translation compensates: t' = Rz (t + root) - root; the mirror negates x
    (the root of a left-right symmetric model lies on x = 0)."""
    t = rotation_z(params.rot) @ (np.asarray(cam_t, np.float64) + root) - root
    if params.flip:
        t = t * np.array([-1.0, 1.0, 1.0])
    return t.astype(np.asarray(cam_t).dtype)
