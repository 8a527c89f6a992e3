"""The pose sampler: within limits, anatomically oriented, diverse, left/right symmetric."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fitting.body_model import load_body_model
from fitting.errors import BadInput
from fitting.keypoints import SMPL_FLIP_PERM, SMPL_JOINT_NAMES
from fitting.pose_sampler import (
    ARCHETYPES,
    archetype_pose,
    joint_limits,
    mirror_body_pose,
    sample_anatomical,
    sample_body_poses,
)
from fitting.priors import angle_prior

J = {name: i for i, name in enumerate(SMPL_JOINT_NAMES)}


@pytest.fixture(scope="module")
def model():
    return load_body_model()


@pytest.fixture(scope="module")
def poses():
    return sample_body_poses(3000, np.random.default_rng(0))


def _joints(model, body_pose: np.ndarray) -> np.ndarray:
    body = torch.as_tensor(np.atleast_2d(body_pose), dtype=torch.float32)
    pose = torch.cat([torch.zeros(body.shape[0], 3), body], dim=1)
    with torch.no_grad():
        return model(pose, torch.zeros(body.shape[0], 10)).joints.numpy()


def test_shape_dtype_and_seeding(poses):
    assert poses.shape == (3000, 69) and poses.dtype == np.float32
    assert np.isfinite(poses).all()
    again = sample_body_poses(3000, np.random.default_rng(0))
    np.testing.assert_array_equal(poses, again)
    other = sample_body_poses(3000, np.random.default_rng(1))
    assert np.abs(poses - other).mean() > 0.05
    assert sample_body_poses(0, np.random.default_rng(0)).shape == (0, 69)
    with pytest.raises(BadInput):
        sample_body_poses(-1, np.random.default_rng(0))


def test_angles_stay_within_joint_limits():
    angles = sample_anatomical(2000, np.random.default_rng(2), variety=3.0)
    limits = joint_limits()
    assert (angles >= limits[..., 0] - 1e-12).all() and (angles <= limits[..., 1] + 1e-12).all()


def test_knees_and_elbows_never_bend_backwards(poses):
    # The angle prior is 4 at the rest pose and grows fast with hyperextension.
    assert angle_prior(torch.as_tensor(poses)).max().item() < 4.6


def test_archetypes_bend_the_right_way(model):
    names = ["stand", "sit", "walk", "reach_up", "crouch"]
    j = dict(zip(names, _joints(model, np.stack([archetype_pose(n) for n in names]))))
    rest = _joints(model, np.zeros(69))[0]
    # Sitting: thighs forward (+z: the model faces +z), shins down from the knees.
    for side in ("left", "right"):
        hip, knee, ankle = (J[f"{side}_{p}"] for p in ("hip", "knee", "ankle"))
        assert j["sit"][knee, 2] - j["sit"][hip, 2] > 0.25
        assert j["sit"][knee, 1] - j["sit"][ankle, 1] > 0.25
        assert j["crouch"][knee, 1] > j["crouch"][hip, 1] - 0.05  # knees up to hip height
        assert j["stand"][J[f"{side}_wrist"], 1] < j["stand"][J[f"{side}_shoulder"], 1] - 0.2
    # Walking: the leading (left) foot ahead of the trailing one, the opposite hand forward.
    assert j["walk"][J["left_ankle"], 2] > j["walk"][J["right_ankle"], 2] + 0.2
    assert j["walk"][J["right_wrist"], 2] > j["walk"][J["left_wrist"], 2] + 0.2
    assert j["reach_up"][J["left_wrist"], 1] > rest[J["head"], 1]


@pytest.mark.parametrize("name", ["walk", "twist", "reach_up"])
def test_mirror_swaps_sides(model, name):
    pose = archetype_pose(name)
    np.testing.assert_allclose(mirror_body_pose(mirror_body_pose(pose)), pose)
    a, b = _joints(model, np.stack([pose, mirror_body_pose(pose)]))
    # The mirrored pose puts each joint where the original put its twin, reflected through x = 0
    # (the built-in skeleton is symmetric to well under a millimetre).
    reflected = a[list(SMPL_FLIP_PERM)] * np.array([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(b, reflected, atol=2e-3)


def test_distribution_is_symmetric_and_diverse(poses):
    left_knee, right_knee = poses[:, 9], poses[:, 12]           # x of each knee
    assert abs(left_knee.mean() - right_knee.mean()) < 0.05
    left_hip, right_hip = poses[:, 0], poses[:, 3]
    assert abs(left_hip.mean() - right_hip.mean()) < 0.05
    # Big joints move a lot; poses are not near-copies of each other.
    assert (poses[:, [0, 3, 9, 12]].std(axis=0) > 0.35).all()
    assert (poses[:, 45:51].std(axis=0) > 0.2).all()  # shoulders
    sub = poses[:300]
    dist = np.sqrt(((sub[:, None] - sub[None]) ** 2).mean(-1))[np.triu_indices(300, 1)]
    assert np.quantile(dist, 0.01) > 0.1 and np.median(dist) > 0.2
    # Every archetype shows up: at variety 0 each sampled leg pose is one archetype's.
    legs = sample_body_poses(400, np.random.default_rng(4), variety=0.0)[:, [0, 3]]
    assert len(np.unique(np.round(np.abs(legs), 4), axis=0)) >= len(ARCHETYPES) // 2
