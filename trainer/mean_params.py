"""The regressor's starting point, in the format of SPIN's smpl_mean_params.npz:
    pose  (144,)  24 joint rotations in 6D (`fitting.geometry.rotmat_to_sixd` layout)
    shape (10,)   betas
    cam   (3,)    weak-perspective camera [s, tx, ty]

The built-in file is derived from the project's pose sampler: the rotation average of each body
joint over sampled poses, the global orientation a half turn about x (SMPL's template stands
upright along +y; the camera looks down +z with y pointing down, so the turn makes the body
upright in the image, facing the camera), zero shape and a camera of scale 0.9 centred in the
crop. `python -m trainer.mean_params` rebuilds it. A user's SPIN file loads through the same
reader (no pickle).
"""
from __future__ import annotations

import math
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import roma
import torch

from fitting.errors import BadInput
from fitting.npz import read_npz
from fitting.geometry import pose_to_rotmat, rotmat_to_pose, rotmat_to_sixd, sixd_to_rotmat
from fitting.pose_sampler import sample_body_poses

MEAN_PARAM_SHAPES = {"pose": (144,), "shape": (10,), "cam": (3,)}
UPRIGHT_ORIENT = (math.pi, 0.0, 0.0)  # axis-angle of the global orientation
MEAN_CAM = (0.9, 0.0, 0.0)


def builtin_mean_params_path() -> Path:
    return Path(str(resources.files("trainer") / "assets" / "mean_params.npz"))


def mean_params_from_poses(body_poses: np.ndarray, cam: tuple[float, float, float] = MEAN_CAM) -> dict[str, np.ndarray]:
    """Mean parameters from (N, 69) axis-angle body poses.

    Each joint's mean rotation is the chordal L2 average: the rotation nearest to the
    arithmetic mean of its rotation matrices."""
    poses = torch.as_tensor(np.asarray(body_poses), dtype=torch.float64)
    if poses.ndim != 2 or poses.shape[1] != 69 or len(poses) == 0:
        raise BadInput(f"expected (N, 69) body poses, got {tuple(poses.shape)}")
    full = torch.cat([poses.new_tensor(UPRIGHT_ORIENT).expand(len(poses), 3), poses], dim=1)
    rotmats = pose_to_rotmat(full)                    # (N, 24, 3, 3)
    mean = roma.special_procrustes(rotmats.mean(dim=0))  # (24, 3, 3)
    mean[0] = pose_to_rotmat(poses.new_tensor(UPRIGHT_ORIENT)[None])[0, 0]
    return {
        "pose": rotmat_to_sixd(mean).reshape(144).numpy().astype(np.float32),
        "shape": np.zeros(10, dtype=np.float32),
        "cam": np.asarray(cam, dtype=np.float32),
    }


def mean_pose_axis_angle(params: dict[str, np.ndarray]) -> np.ndarray:
    """(72,) axis-angle pose of the mean parameters (SMPLify's starting pose)."""
    sixd = torch.as_tensor(np.asarray(params["pose"]), dtype=torch.float64).reshape(1, 24, 6)
    return rotmat_to_pose(sixd_to_rotmat(sixd))[0].numpy().astype(np.float32)


def build_mean_params(num_poses: int = 20000, seed: int = 0) -> dict[str, np.ndarray]:
    """The built-in mean parameters from `fitting.pose_sampler` (deterministic in `seed`)."""
    poses = sample_body_poses(num_poses, np.random.default_rng(seed))
    return mean_params_from_poses(np.asarray(poses))


def validate_mean_params(params: dict[str, np.ndarray], source: str = "mean params") -> None:
    for key, shape in MEAN_PARAM_SHAPES.items():
        if key not in params:
            raise BadInput(f"{source}: missing key '{key}'")
        value = np.asarray(params[key])
        if value.size != int(np.prod(shape)):
            raise BadInput(f"{source}: '{key}' has shape {value.shape}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise BadInput(f"{source}: '{key}' contains NaN or Inf")


def save_mean_params(params: dict[str, np.ndarray], path: str | Path) -> None:
    validate_mean_params(params)
    np.savez(path, **{k: np.asarray(params[k], dtype=np.float32).reshape(MEAN_PARAM_SHAPES[k]) for k in MEAN_PARAM_SHAPES})


def load_mean_params(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The built-in mean parameters (path None) or a user's smpl_mean_params.npz, validated."""
    path = builtin_mean_params_path() if path is None else Path(path)
    params = read_npz(path, MEAN_PARAM_SHAPES, what="mean params")
    validate_mean_params(params, source=str(path))
    return {k: params[k].astype(np.float32).reshape(MEAN_PARAM_SHAPES[k]) for k in MEAN_PARAM_SHAPES}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else builtin_mean_params_path()
    save_mean_params(build_mean_params(), out)
    print(out)
