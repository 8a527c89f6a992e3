"""Augmentation: image, keypoints, 3D joints and SMPL pose stay consistent under SPIN's
rotate-then-flip, checked by projecting the augmented fit through the real smplx model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fitting.body_model import BodyModel, default_extra_regressor
from fitting.camera import perspective_projection, pixels_to_normalized
from fitting.keypoints import FLIP_PERM, GT24, SMPL_FLIP_PERM, VERTEX_JOINT_NAMES
from tests.toy_body import make_toy_smpl
from trainer.augment import (
    AugmentConfig, AugParams, augment_image, augment_joints3d, augment_keypoints, augment_pose,
    augment_translation, flip_pose, rotate_global_orient, sample_params,
)

MIRROR = np.array([-1.0, 1.0, 1.0])


def _mirror_name(name: str) -> str:
    for a, b in (("l", "r"), ("L", "R")):
        if name.startswith(a):
            return b + name[1:]
        if name.startswith(b):
            return a + name[1:]
    return name


def _symmetrize_rows(rows: np.ndarray, pair: list[int], half: int) -> np.ndarray:
    """Rows of a vertex regressor over [vertices, mirrored vertices]: row k and its mirror
    row pair[k] become exact mirror images of each other."""
    swapped = np.concatenate([rows[:, half:], rows[:, :half]], axis=1)
    return 0.5 * (rows + swapped[pair])


def symmetric_model(half: int = 1200, seed: int = 0) -> BodyModel:
    """A left-right symmetric SMPL-layout model: the toy body plus its mirror image, joints and
    keypoint regressors symmetrized, so that flip_pose(pose) poses exactly the mirrored body."""
    toy = make_toy_smpl(num_vertices=half, seed=seed)
    v = toy["v_template"].astype(np.float64)
    nose = int(np.argmax(v[:, 1]))
    v[nose, 0] = 0.0
    shapedirs = toy["shapedirs"].astype(np.float64)
    shapedirs[nose, 0] = 0.0
    weights = toy["weights"].copy()
    weights[nose] = np.eye(24)[15]
    perm = list(SMPL_FLIP_PERM)
    zero_j = np.concatenate([toy["J_regressor"], np.zeros_like(toy["J_regressor"])], axis=1)
    arrays = {
        "v_template": np.concatenate([v, v * MIRROR]).astype(np.float32),
        "shapedirs": np.concatenate([shapedirs, shapedirs * MIRROR[None, :, None]]).astype(np.float32),
        "posedirs": np.zeros((2 * half, 3, 207), np.float32),
        "J_regressor": _symmetrize_rows(zero_j, perm, half).astype(np.float32),
        "weights": np.concatenate([weights, weights[:, perm]]).astype(np.float32),
        "kintree_table": toy["kintree_table"],
        "f": toy["f"],
    }
    rng = np.random.default_rng(seed)
    ids = {}
    for name in VERTEX_JOINT_NAMES:
        if name == "nose":
            ids[name] = nose
        elif name not in ids:
            i = int(rng.integers(half))
            left = name[0] in "lL"
            ids[name], ids[_mirror_name(name)] = (i, i + half) if left else (i + half, i)
    arrays["vertex_joint_ids"] = np.array([ids[n] for n in VERTEX_JOINT_NAMES])
    extra = default_extra_regressor(arrays)
    extra = np.concatenate([extra[:, :half] + extra[:, half:], np.zeros((9, half))], axis=1)
    arrays["J_regressor_extra"] = _symmetrize_rows(extra, [1, 0, 2, 3, 4, 5, 6, 7, 8], half).astype(np.float32)
    return BodyModel(arrays)


@pytest.fixture(scope="module")
def body() -> BodyModel:
    return symmetric_model()


def _fit_keypoints(body: BodyModel, pose: np.ndarray, betas: np.ndarray, cam_t: np.ndarray):
    """(49, 2) normalized keypoints of a fit and its (3,) root joint."""
    with torch.no_grad():
        out = body(torch.as_tensor(pose, dtype=torch.float32)[None], torch.as_tensor(betas, dtype=torch.float32)[None])
    px = perspective_projection(out.keypoints, torch.as_tensor(cam_t, dtype=torch.float32)[None])
    return pixels_to_normalized(px, 224)[0].numpy(), out.joints[0, 0].numpy()


def _random_fit(seed: int):
    rng = np.random.default_rng(seed)
    pose = rng.normal(scale=0.35, size=72)
    pose[:3] = [np.pi + 0.2, 0.3, -0.1]
    return pose, rng.normal(size=10), np.array([0.05, 0.1, 25.0])


@pytest.mark.parametrize("params", [
    AugParams(flip=True), AugParams(rot=27.0), AugParams(rot=-48.0, flip=True),
])
def test_augmented_fit_projects_onto_augmented_keypoints(body, params):
    pose, betas, cam_t = _random_fit(1)
    kp2d, root = _fit_keypoints(body, pose, betas, cam_t)
    keypoints = np.concatenate([kp2d, np.ones((49, 1))], axis=1)
    target = augment_keypoints(keypoints, params)[:, :2]
    moved = augment_translation(cam_t, root, params)
    projected, _ = _fit_keypoints(body, augment_pose(pose, params), betas, moved)
    assert np.abs(projected - target).max() < 2e-4
    assert np.abs(target - kp2d).max() > 0.05  # the augmentation did move the keypoints


def test_flip_then_rotate_is_the_wrong_order(body):
    pose, betas, cam_t = _random_fit(2)
    params = AugParams(rot=35.0, flip=True)
    kp2d, root = _fit_keypoints(body, pose, betas, cam_t)
    target = augment_keypoints(np.concatenate([kp2d, np.ones((49, 1))], axis=1), params)[:, :2]
    wrong = rotate_global_orient(flip_pose(pose), params.rot)
    projected, _ = _fit_keypoints(body, wrong, betas, augment_translation(cam_t, root, params))
    assert np.abs(projected - target).max() > 0.01


def test_flip_pose_is_an_involution_and_flip_perm_pairs_sides():
    pose = np.random.default_rng(0).normal(size=72)
    assert np.allclose(flip_pose(flip_pose(pose)), pose)
    assert all(FLIP_PERM[FLIP_PERM[k]] == k for k in range(49))


def test_joints3d_follow_the_keypoints():
    rng = np.random.default_rng(3)
    joints = np.concatenate([rng.normal(scale=0.4, size=(24, 3)), np.ones((24, 1))], axis=1)
    joints[:, 2] += 10.0
    def project(j):
        px = perspective_projection(torch.as_tensor(j[None, :, :3]), torch.zeros(1, 3, dtype=torch.float64))
        return pixels_to_normalized(px, 224)[0].numpy()
    keypoints = np.zeros((49, 3))
    keypoints[list(GT24), :2] = project(joints)
    for params in (AugParams(rot=20.0), AugParams(rot=-33.0, flip=True)):
        expected = augment_keypoints(keypoints, params)[list(GT24), :2]
        assert np.abs(project(augment_joints3d(joints, params)) - expected).max() < 1e-9


@pytest.mark.parametrize("params", [
    AugParams(), AugParams(flip=True), AugParams(rot=30.0, scale=1.2), AugParams(rot=-50.0, scale=0.8, flip=True),
])
def test_image_moves_with_the_keypoints(params):
    size, res = 160, 96
    point = np.array([0.35, -0.25])
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, continuous coordinates
    centre = (point + 1) * size / 2
    blob = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * 4.0 ** 2))
    image = np.repeat((255 * blob).astype(np.uint8)[..., None], 3, axis=2)
    out = augment_image(image, params, res)[..., 0].astype(np.float64)
    assert out.shape == (res, res)
    oy, ox = np.mgrid[0:res, 0:res] + 0.5
    found = np.array([(ox * out).sum(), (oy * out).sum()]) / out.sum() * 2 / res - 1
    keypoints = np.zeros((49, 3))
    keypoints[0, :2] = point  # OP Nose flips onto itself
    expected = augment_keypoints(keypoints, params)[0, :2]
    assert np.abs(found - expected).max() < 0.02


def test_colour_noise_scales_channels():
    image = np.full((8, 8, 3), 100, np.uint8)
    out = augment_image(image, AugParams(pn=(0.5, 1.0, 3.0)), 8)
    assert out[0, 0].tolist() == [50, 100, 255]


def test_sampled_parameters_follow_spin():
    rng = np.random.default_rng(0)
    config = AugmentConfig()
    params = [sample_params(rng, config) for _ in range(2000)]
    rots = np.array([p.rot for p in params])
    scales = np.array([p.scale for p in params])
    pns = np.array([p.pn for p in params])
    assert np.abs(rots).max() <= 60 and 0.5 < np.mean(rots == 0) < 0.7
    assert scales.min() >= 0.75 and scales.max() <= 1.25
    assert pns.min() >= 0.6 and pns.max() <= 1.4
    assert 0.45 < np.mean([p.flip for p in params]) < 0.55
