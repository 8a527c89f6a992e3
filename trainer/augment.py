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

The keypoints backbone trains on whole batches of keypoints at once (`BatchAugParams`, the
`*_batch` functions, in torch): the same rotation, scale and flip, plus what only a keypoint
input needs, since its input and its target are the same keypoints: the input alone loses each
keypoint with probability `keypoint_dropout` and gets Gaussian jitter (`keypoint_jitter`, in
normalized crop units), so that the network learns to fill in what a detector misses.
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
    keypoint_dropout: float = 0.0    # keypoints backbone only: input keypoints dropped (confidence 0)
    keypoint_jitter: float = 0.0     # keypoints backbone only: input noise sd, normalized crop units


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


def _one(params: AugParams) -> BatchAugParams:
    return BatchAugParams(flip=torch.tensor([params.flip]), rot=torch.tensor([params.rot], dtype=torch.float64),
                          scale=torch.tensor([params.scale], dtype=torch.float64))


def augment_keypoints(keypoints: np.ndarray, params: AugParams) -> np.ndarray:
    """(49, 3) normalized keypoints with confidence -> the same after augmentation."""
    out = augment_keypoints_batch(torch.from_numpy(keypoints.astype(np.float64))[None], _one(params))
    return out[0].numpy().astype(keypoints.dtype)


def augment_joints3d(joints: np.ndarray, params: AugParams) -> np.ndarray:
    """(24, 4) ground-truth 3D joints (camera frame, + confidence) -> the same after augmentation."""
    out = augment_joints3d_batch(torch.from_numpy(joints.astype(np.float64))[None], _one(params))
    return out[0].numpy().astype(joints.dtype)


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


@dataclass(frozen=True)
class BatchAugParams:
    """Augmentation of a batch of B samples, as tensors."""
    flip: torch.Tensor                   # (B,) bool
    rot: torch.Tensor                    # (B,) degrees
    scale: torch.Tensor                  # (B,)
    drop: torch.Tensor | None = None     # (B, 49) bool: input keypoints dropped
    jitter: torch.Tensor | None = None   # (B, 49, 2) input keypoint noise


def sample_batch_params(rng: np.random.Generator, config: AugmentConfig, n: int) -> BatchAugParams:
    """`sample_params`' flip, rotation and scale distributions for n samples at once, and the
    keypoint input's dropout and jitter."""
    flip = rng.uniform(size=n) < config.flip_prob
    rot = np.clip(rng.normal(size=n) * config.rot_factor, -2 * config.rot_factor, 2 * config.rot_factor)
    rot = np.where(rng.uniform(size=n) < config.rot_prob, rot, 0.0)
    scale = np.clip(rng.normal(size=n) * config.scale_factor + 1, 1 - config.scale_factor, 1 + config.scale_factor)
    drop = rng.uniform(size=(n, 49)) < config.keypoint_dropout if config.keypoint_dropout > 0 else None
    jitter = rng.normal(scale=config.keypoint_jitter, size=(n, 49, 2)) if config.keypoint_jitter > 0 else None
    tensor = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    return BatchAugParams(flip=torch.from_numpy(flip), rot=tensor(rot), scale=tensor(scale),
                          drop=None if drop is None else torch.from_numpy(drop), jitter=tensor(jitter))


def rotations_z(degrees: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 3, 3) rotations about the optical axis (`rotation_z` for a batch)."""
    rotvec = torch.zeros(len(degrees), 3, dtype=degrees.dtype, device=degrees.device)
    rotvec[:, 2] = torch.deg2rad(degrees)
    return roma.rotvec_to_rotmat(rotvec)


def _mirror_where(flip: torch.Tensor, points: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """(B, K, C) points (x first) -> mirrored (x negated, `perm` applied) where flip (B,) is set."""
    sign = torch.ones(points.shape[-1], dtype=points.dtype, device=points.device)
    sign[0] = -1.0
    return torch.where(flip[:, None, None], points[:, list(perm)] * sign, points)


def augment_keypoints_batch(keypoints: torch.Tensor, params: BatchAugParams) -> torch.Tensor:
    """(B, 49, 3) normalized keypoints with confidence -> the same after augmentation (rotate
    and scale, then flip). A new tensor; the input is untouched."""
    turn = rotations_z(params.rot.to(keypoints.dtype))[:, :2, :2]
    xy = (keypoints[..., :2] @ turn.transpose(1, 2)) / params.scale.to(keypoints.dtype)[:, None, None]
    return _mirror_where(params.flip, torch.cat([xy, keypoints[..., 2:]], dim=-1), FLIP_PERM)


def augment_joints3d_batch(joints: torch.Tensor, params: BatchAugParams) -> torch.Tensor:
    """(B, 24, 4) ground-truth 3D joints (camera frame, + confidence) -> the same after augmentation."""
    turned = joints[..., :3] @ rotations_z(params.rot.to(joints.dtype)).transpose(1, 2)
    return _mirror_where(params.flip, torch.cat([turned, joints[..., 3:]], dim=-1), GT24_FLIP_PERM)


def flip_rotmat(rotmat: torch.Tensor) -> torch.Tensor:
    """(B, 24, 3, 3) SMPL pose of the mirrored body: joints swapped left and right, each rotation
    conjugated by the mirror x -> -x (`flip_pose` for rotation matrices)."""
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=rotmat.dtype, device=rotmat.device))
    return mirror @ rotmat[:, list(SMPL_FLIP_PERM)] @ mirror


def augment_rotmat_batch(rotmat: torch.Tensor, params: BatchAugParams) -> torch.Tensor:
    """(B, 24, 3, 3) pose targets -> the same after augmentation: the global orientation turned
    by Rz(rot), then the mirrored pose where flipped."""
    orient = rotations_z(params.rot.to(rotmat.dtype)) @ rotmat[:, 0]
    turned = torch.cat([orient[:, None], rotmat[:, 1:]], dim=1)
    return torch.where(params.flip[:, None, None, None], flip_rotmat(turned), turned)


def corrupt_keypoints(keypoints: torch.Tensor, params: BatchAugParams) -> torch.Tensor:
    """(B, 49, 3) keypoints -> the keypoint backbone's input: jittered, and with the dropped
    keypoints' confidence set to 0 (the encoder then ignores their coordinates)."""
    xy, conf = keypoints[..., :2], keypoints[..., 2]
    if params.jitter is not None:
        xy = xy + params.jitter.to(xy.dtype)
    if params.drop is not None:
        conf = torch.where(params.drop, torch.zeros_like(conf), conf)
    return torch.cat([xy, conf[..., None]], dim=-1)
