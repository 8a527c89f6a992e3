"""Plausible, diverse SMPL body poses: archetypes (standing, walking, running, sitting, reaching,
bending, crouching, ...) blended per body part with random amplitude, jittered, clipped to joint
limits and mirrored left/right.

Angles are written "anatomically": per joint (x, y, z) Euler angles composed as
R = R_y(y) R_x(x) R_z(z) in the joint's parent frame (SMPL's rest pose is a T-pose facing +z,
y up, the body's left at +x). For a left limb, on the rest pose:
    hip     x < 0 flexes the thigh forward, z > 0 abducts;   knee  x > 0 flexes;
    ankle   x > 0 points the toes;                            spine/neck x > 0 bends forward;
    shoulder z < 0 lowers the arm, then x < 0 swings the lowered arm forward and y < 0 swings a
            raised arm forward;                               elbow y < 0 flexes.
Right-side joints use the same numbers and are mirrored into SMPL's frame (y and z negate), so
left and right share one table of archetypes and limits.
"""
from __future__ import annotations

import numpy as np
import roma
import torch

from fitting.errors import BadInput
from fitting.keypoints import SMPL_FLIP_PERM, SMPL_JOINT_NAMES

BODY_JOINTS: tuple[str, ...] = SMPL_JOINT_NAMES[1:]  # the 23 joints of the 69-d body pose
_RIGHT = np.array([name.startswith("right_") for name in BODY_JOINTS])


def _side_free(name: str) -> str:
    return name.removeprefix("left_").removeprefix("right_")


# Per-joint anatomical limits (radians): (x_lo, x_hi), (y_lo, y_hi), (z_lo, z_hi).
_LIMITS: dict[str, tuple[tuple[float, float], ...]] = {
    "hip": ((-2.3, 0.6), (-0.7, 0.7), (-0.4, 1.0)),
    "knee": ((0.0, 2.5), (-0.15, 0.15), (-0.1, 0.1)),
    "ankle": ((-0.6, 0.8), (-0.4, 0.4), (-0.3, 0.3)),
    "foot": ((-0.3, 0.4), (-0.1, 0.1), (-0.1, 0.1)),
    "spine1": ((-0.3, 0.6), (-0.35, 0.35), (-0.3, 0.3)),
    "spine2": ((-0.3, 0.6), (-0.35, 0.35), (-0.3, 0.3)),
    "spine3": ((-0.3, 0.6), (-0.35, 0.35), (-0.3, 0.3)),
    "neck": ((-0.5, 0.6), (-0.6, 0.6), (-0.4, 0.4)),
    "head": ((-0.4, 0.5), (-0.5, 0.5), (-0.3, 0.3)),
    "collar": ((-0.2, 0.2), (-0.3, 0.3), (-0.3, 0.4)),
    "shoulder": ((-2.4, 0.8), (-1.5, 0.7), (-1.45, 1.2)),
    "elbow": ((-0.6, 0.6), (-2.5, 0.0), (-0.2, 0.2)),
    "wrist": ((-1.0, 1.0), (-0.5, 0.5), (-0.8, 0.8)),
    "hand": ((-0.3, 0.3), (-0.3, 0.3), (-0.3, 0.3)),
}
# Jitter scale per joint (radians at variety 1).
_JITTER: dict[str, float] = {
    "hip": 0.15, "knee": 0.15, "ankle": 0.12, "foot": 0.08, "spine1": 0.07, "spine2": 0.07,
    "spine3": 0.07, "neck": 0.15, "head": 0.12, "collar": 0.08, "shoulder": 0.2, "elbow": 0.2,
    "wrist": 0.25, "hand": 0.12,
}

_ARMS_DOWN = {"left_shoulder": (0, 0, -1.25), "right_shoulder": (0, 0, -1.25),
              "left_elbow": (0, -0.15, 0), "right_elbow": (0, -0.15, 0)}

# Archetypes: joint -> anatomical (x, y, z); joints not named stay at the rest pose.
ARCHETYPES: dict[str, dict[str, tuple[float, float, float]]] = {
    "stand": {**_ARMS_DOWN, "left_knee": (0.05, 0, 0), "right_knee": (0.05, 0, 0)},
    "walk": {
        **_ARMS_DOWN, "left_hip": (-0.45, 0, 0.03), "left_knee": (0.15, 0, 0), "left_ankle": (-0.1, 0, 0),
        "right_hip": (0.3, 0, 0.03), "right_knee": (0.45, 0, 0), "right_ankle": (0.3, 0, 0),
        "left_shoulder": (0.35, 0, -1.25), "right_shoulder": (-0.4, 0, -1.25),
        "left_elbow": (0, -0.3, 0), "right_elbow": (0, -0.5, 0),
        "spine1": (0, 0.08, 0), "spine2": (0, 0.08, 0),
    },
    "run": {
        "left_hip": (-1.1, 0, 0), "left_knee": (1.0, 0, 0), "right_hip": (0.45, 0, 0),
        "right_knee": (1.7, 0, 0), "right_ankle": (0.4, 0, 0),
        "left_shoulder": (0.7, 0, -1.1), "right_shoulder": (-0.8, 0, -1.1),
        "left_elbow": (0, -1.6, 0), "right_elbow": (0, -1.6, 0),
        "spine1": (0.15, 0.1, 0), "spine2": (0.1, 0.1, 0),
    },
    "sit": {
        "left_hip": (-1.55, 0, 0.05), "right_hip": (-1.55, 0, 0.05), "left_knee": (1.6, 0, 0),
        "right_knee": (1.6, 0, 0), "left_ankle": (-0.1, 0, 0), "right_ankle": (-0.1, 0, 0),
        "left_shoulder": (-0.3, 0, -1.2), "right_shoulder": (-0.3, 0, -1.2),
        "left_elbow": (0, -1.1, 0), "right_elbow": (0, -1.1, 0),
        "spine1": (0.1, 0, 0), "spine2": (0.1, 0, 0), "neck": (0.15, 0, 0),
    },
    "reach_up": {
        "left_collar": (0, 0, 0.2), "left_shoulder": (0, 0, 1.1), "left_elbow": (0, -0.1, 0),
        "right_shoulder": (0, 0, -1.25), "right_elbow": (0, -0.2, 0),
        "spine2": (0, 0, 0.08), "spine3": (0, 0, 0.08), "neck": (-0.3, 0, 0),
    },
    "reach_forward": {
        "left_shoulder": (0, -1.3, -0.3), "left_elbow": (0, -0.2, 0),
        "right_shoulder": (0, 0, -1.25), "right_elbow": (0, -0.2, 0),
        "spine1": (0.1, -0.15, 0), "spine2": (0.1, -0.1, 0), "left_hip": (-0.1, 0, 0),
    },
    "bend": {
        "spine1": (0.45, 0, 0), "spine2": (0.35, 0, 0), "spine3": (0.3, 0, 0), "neck": (-0.2, 0, 0),
        "left_hip": (-0.7, 0, 0), "right_hip": (-0.7, 0, 0), "left_knee": (0.15, 0, 0), "right_knee": (0.15, 0, 0),
        "left_shoulder": (-0.9, 0, -1.3), "right_shoulder": (-0.9, 0, -1.3),
    },
    "crouch": {
        "left_hip": (-2.1, 0, 0.25), "right_hip": (-2.1, 0, 0.25), "left_knee": (2.3, 0, 0),
        "right_knee": (2.3, 0, 0), "left_ankle": (-0.5, 0, 0), "right_ankle": (-0.5, 0, 0),
        "spine1": (0.35, 0, 0), "spine2": (0.3, 0, 0), "spine3": (0.2, 0, 0), "neck": (-0.3, 0, 0),
        "left_shoulder": (-0.9, 0, -1.0), "right_shoulder": (-0.9, 0, -1.0),
        "left_elbow": (0, -0.8, 0), "right_elbow": (0, -0.8, 0),
    },
    "kneel": {
        **_ARMS_DOWN, "left_hip": (-1.5, 0, 0), "left_knee": (1.6, 0, 0),
        "right_hip": (-0.1, 0, 0), "right_knee": (1.6, 0, 0), "right_ankle": (0.6, 0, 0),
    },
    "kick": {
        "left_hip": (-1.3, 0, 0), "left_knee": (0.2, 0, 0), "right_knee": (0.1, 0, 0),
        "left_shoulder": (0, 0, -0.6), "right_shoulder": (0, 0, -0.6),
        "left_elbow": (0, -0.3, 0), "right_elbow": (0, -0.3, 0), "spine1": (-0.1, 0, 0),
    },
    "lunge": {
        **_ARMS_DOWN, "left_hip": (-1.2, 0, 0), "left_knee": (1.3, 0, 0),
        "right_hip": (0.6, 0, 0), "right_knee": (0.3, 0, 0), "spine1": (0.05, 0, 0),
    },
    "arms_out": {"left_shoulder": (0, 0, -0.15), "right_shoulder": (0, 0, -0.15),
                 "left_elbow": (0, -0.1, 0), "right_elbow": (0, -0.1, 0)},
    "hands_to_face": {
        "left_shoulder": (-0.6, -0.3, -1.2), "right_shoulder": (-0.6, -0.3, -1.2),
        "left_elbow": (0, -2.2, 0), "right_elbow": (0, -2.2, 0), "neck": (0.2, 0, 0),
    },
    "twist": {
        **_ARMS_DOWN, "spine1": (0, 0.3, 0), "spine2": (0, 0.3, 0), "spine3": (0, 0.25, 0),
        "neck": (0, 0.3, 0), "left_shoulder": (-0.4, 0, -1.2), "right_shoulder": (0.4, 0, -1.2),
    },
    "stretch_up": {
        "left_shoulder": (0, 0, 1.0), "right_shoulder": (0, 0, 1.0), "left_ankle": (0.5, 0, 0),
        "right_ankle": (0.5, 0, 0), "spine1": (-0.15, 0, 0), "spine2": (-0.1, 0, 0), "neck": (-0.2, 0, 0),
    },
    "side_step": {
        "left_hip": (0, 0, 0.5), "right_hip": (0, 0, 0.2), "left_knee": (0.1, 0, 0),
        "left_shoulder": (0, 0, -0.9), "right_shoulder": (0, 0, -0.9), "spine1": (0, 0, -0.08),
    },
}

_GROUPS: dict[str, tuple[str, ...]] = {
    "legs": ("left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
             "left_foot", "right_foot"),
    "torso": ("spine1", "spine2", "spine3", "neck", "head"),
    "left_arm": ("left_collar", "left_shoulder", "left_elbow", "left_wrist", "left_hand"),
    "right_arm": ("right_collar", "right_shoulder", "right_elbow", "right_wrist", "right_hand"),
}


def joint_limits() -> np.ndarray:
    """(23, 3, 2) anatomical [lo, hi] per body joint and axis (x, y, z)."""
    return np.array([_LIMITS[_side_free(n)] for n in BODY_JOINTS], dtype=np.float64)


def archetype_angles(name: str) -> np.ndarray:
    """(23, 3) anatomical angles of one archetype."""
    if name not in ARCHETYPES:
        raise BadInput(f"unknown pose archetype '{name}'; known: {', '.join(ARCHETYPES)}")
    angles = np.zeros((len(BODY_JOINTS), 3))
    for joint, value in ARCHETYPES[name].items():
        angles[BODY_JOINTS.index(joint)] = value
    return angles


def anatomical_to_body_pose(angles: np.ndarray) -> np.ndarray:
    """(..., 23, 3) anatomical angles -> (..., 69) SMPL axis-angle body pose (float64)."""
    angles = np.array(angles, dtype=np.float64)  # a copy: the mirror below writes into it
    angles[..., _RIGHT, 1:] *= -1.0
    # roma's 'zxy' (lower case: extrinsic) is R_y R_x R_z, the composition the table assumes.
    zxy = torch.from_numpy(angles[..., [2, 0, 1]])
    rotvec = roma.euler_to_rotvec("zxy", zxy).numpy()
    return rotvec.reshape(*angles.shape[:-2], 3 * angles.shape[-2])


def archetype_pose(name: str) -> np.ndarray:
    """(69,) SMPL body pose of one archetype, as written (left side leading)."""
    return anatomical_to_body_pose(archetype_angles(name)).astype(np.float32)


def mirror_body_pose(body_pose: np.ndarray) -> np.ndarray:
    """(..., 69) -> the left/right mirror image: joints swapped, axis-angle y and z negated."""
    perm = np.array(SMPL_FLIP_PERM[1:]) - 1
    pose = np.asarray(body_pose).reshape(*np.shape(body_pose)[:-1], 23, 3)[..., perm, :].copy()
    pose[..., 1:] *= -1.0
    return pose.reshape(*pose.shape[:-2], 69)


def sample_anatomical(n: int, rng: np.random.Generator, variety: float = 1.0) -> np.ndarray:
    """(n, 23, 3) anatomical angles within the joint limits (before mirroring)."""
    table = np.stack([archetype_angles(a) for a in ARCHETYPES])  # (A, 23, 3)
    num = len(ARCHETYPES)
    first = rng.integers(num, size=n)
    second = rng.integers(num, size=n)
    # Which archetype drives each body part: mostly the first; arms move as a pair unless
    # one of them breaks away, which gives arm/leg combinations of two archetypes.
    arms_second = rng.random(n) < 0.35
    source = {
        "legs": first,
        "torso": np.where(rng.random(n) < 0.2, second, first),
        "left_arm": np.where(arms_second ^ (rng.random(n) < 0.15), second, first),
        "right_arm": np.where(arms_second ^ (rng.random(n) < 0.15), second, first),
    }
    # Amplitude scales the departure from relaxed standing (not from the T-pose), so a
    # weakened archetype drops its arms rather than holding them out.
    relaxed = archetype_angles("stand")
    angles = np.zeros((n, len(BODY_JOINTS), 3))
    for group, joints in _GROUPS.items():
        idx = [BODY_JOINTS.index(j) for j in joints]
        other = np.where(source[group] == first, second, first)
        blend = variety * rng.uniform(0.0, 0.5, size=(n, 1, 1))
        amplitude = rng.uniform(1.0 - 0.6 * variety, 1.0 + 0.15 * variety, size=(n, 1, 1))
        mixed = (1.0 - blend) * table[source[group]][:, idx] + blend * table[other][:, idx]
        angles[:, idx] = relaxed[idx] + amplitude * (mixed - relaxed[idx])
    jitter = np.array([_JITTER[_side_free(j)] for j in BODY_JOINTS])[None, :, None]
    angles = angles + variety * jitter * rng.standard_normal(angles.shape)
    limits = joint_limits()
    return np.clip(angles, limits[..., 0], limits[..., 1])


def sample_body_poses(n: int, rng: np.random.Generator, variety: float = 1.0) -> np.ndarray:
    """(n, 69) float32 SMPL body poses (no global orientation), half of them mirrored.

    variety 0 gives the bare archetypes; 1 is the default spread; larger values widen blends
    and jitter (always inside the joint limits)."""
    if n < 0 or variety < 0:
        raise BadInput(f"need n >= 0 and variety >= 0, got n={n}, variety={variety}")
    poses = anatomical_to_body_pose(sample_anatomical(n, rng, variety))
    flip = rng.random(n) < 0.5
    poses[flip] = mirror_body_pose(poses[flip])
    return poses.astype(np.float32)
