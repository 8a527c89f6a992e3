"""SMPLify: configuration, the energy terms, fits on synthetic keypoints, bad samples, purity."""
from __future__ import annotations

import math

import numpy as np
import pytest
import roma
import torch

from fitting.body_model import BodyModel, load_body_model
from fitting.camera import estimate_translation, perspective_projection
from fitting.errors import BadInput
from fitting.geometry import similarity_align
from fitting.keypoint_body import KeypointBody, rigid_keypoints
from fitting.keypoints import FIT_IGNORED, GT_TORSO, LSP14, OP_TORSO
from fitting.objective import body_energy_terms, body_residuals, camera_residuals, fit_confidence, gmof
from fitting.pose_sampler import sample_body_poses
from fitting.priors import angle_prior
from fitting.priors import load_prior
from fitting.smplify import (
    FitInit,
    SmplifyConfig,
    StageConfig,
    _stage_residuals,
    default_mean_pose,
    fit,
    mean_init,
    score,
)
from fitting.solvers import SOLVERS, StageProblem, adam, register_solver
from tests.toy_body import make_toy_smpl


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small batches run fastest on one thread, and CI shares its cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BodyModel(make_toy_smpl(seed=0))


@pytest.fixture(scope="module")
def human():
    """The built-in body model: fit quality is judged on a realistic body."""
    return load_body_model()


@pytest.fixture(scope="module")
def prior():
    return load_prior()


def synthetic(model, n: int, seed: int, yaw: float = 0.5):
    """Ground-truth pose, betas, camera and clean keypoints (pixels, conf 1) for n people."""
    rng = np.random.default_rng(seed)
    body = torch.as_tensor(sample_body_poses(n, rng))
    upright = torch.tensor([[math.pi, 0.0, 0.0]]).expand(n, 3)
    turn = torch.as_tensor(np.c_[np.zeros(n), rng.uniform(-yaw, yaw, n), np.zeros(n)], dtype=torch.float32)
    orient = roma.rotvec_composition([upright, turn])
    pose = torch.cat([orient, body], dim=1)
    betas = torch.as_tensor(rng.normal(size=(n, 10)), dtype=torch.float32)
    depth = 2 * 5000 / (224 * rng.uniform(0.8, 1.0, n))
    cam_t = torch.as_tensor(np.c_[rng.normal(0, 0.03, (n, 2)), depth], dtype=torch.float32)
    with torch.no_grad():
        joints3d = model(pose, betas).keypoints
    kp = torch.cat([perspective_projection(joints3d, cam_t), torch.ones(n, 49, 1)], dim=-1)
    return pose, betas, cam_t, joints3d, kp


def pa_mpjpe_mm(model, pose, betas, joints3d):
    with torch.no_grad():
        pred = model(pose, betas).keypoints[:, LSP14]
    gt = joints3d[:, LSP14]
    return 1000 * (similarity_align(pred, gt) - gt).norm(dim=-1).mean(dim=-1)


def short(camera: int = 60, body: int = 100) -> SmplifyConfig:
    return SmplifyConfig(stages=[StageConfig("camera", camera, solver="adam"), StageConfig("body", body, solver="adam")])


# ---------------------------------------------------------------- configuration

def test_config_round_trip_and_defaults():
    config = SmplifyConfig()
    assert [(s.name, s.iterations, s.lr, s.solver) for s in config.stages] == [
        ("camera", 100, 0.01, "lm"), ("body", 100, 0.01, "lm")]
    assert config.stages[0].optimize == ("global_orient", "cam_t")
    assert set(config.stages[1].optimize) == {"body_pose", "betas", "global_orient"}
    data = config.to_dict()
    assert SmplifyConfig.from_dict(data) == config
    custom = SmplifyConfig.from_dict({"sigma": 50.0, "stages": [{"name": "body", "iterations": 5}]})
    assert custom.sigma == 50.0 and custom.stages[0].iterations == 5


@pytest.mark.parametrize("data, message", [
    ({"sigmaa": 1.0}, "unknown key 'sigmaa'"),
    ({"stages": [{"name": "body", "step": 1}]}, "unknown key 'step'"),
    ({"stages": [{"name": "legs"}]}, "stage name"),
    ({"stages": [{"name": "body", "optimize": ["transl"]}]}, "cannot optimize 'transl'"),
    ({"stages": [{"name": "body", "solver": "magic"}]}, "unknown solver 'magic'"),
    ({"stages": [{"name": "body", "iterations": -1}]}, "iterations"),
    ({"sigma": -1.0}, "sigma"),
    ({"stages": "body"}, "list"),
])
def test_config_rejects_bad_input(data, message):
    with pytest.raises(BadInput, match=message):
        SmplifyConfig.from_dict(data)


# ---------------------------------------------------------------- energy terms

def test_camera_stage_uses_openpose_torso_only_when_complete():
    kp = torch.zeros(2, 49, 3)
    kp[:, list(OP_TORSO), :2] = 10.0
    kp[:, list(GT_TORSO), :2] = 20.0
    kp[:, list(OP_TORSO) + list(GT_TORSO), 2] = 1.0
    kp[1, OP_TORSO[2], 2] = 0.0  # one OpenPose shoulder missing: sample 1 falls back to GT
    kp[1, GT_TORSO[0], 2] = 0.0  # and a missing GT hip is left out
    points = torch.zeros(2, 49, 3)
    cam_t = torch.tensor([[0.0, 0.0, 10.0]]).repeat(2, 1)   # every point projects to (112, 112)
    res = camera_residuals(points, cam_t, cam_t + torch.tensor([0.0, 0.0, 0.5]), kp, 100.0, 5000.0, 224)
    assert res.shape == (2, 9)
    energy = res.square().sum(-1)
    assert energy[0].item() == pytest.approx(8 * 102 ** 2 + 100 ** 2 * 0.25)
    assert energy[1].item() == pytest.approx(6 * 92 ** 2 + 100 ** 2 * 0.25)


def test_score_by_hand_and_ignored_joints(model):
    pose, betas, cam_t, _, kp = synthetic(model, 2, seed=1)
    moved = kp.clone()
    moved[:, 30, 0] += 10.0                   # a fitted joint 10 px off
    moved[:, FIT_IGNORED[0], 0] += 50.0       # an ignored joint is free to be wrong
    moved[1, 30, 2] = 0.5
    loss, joint_loss = score(model, None, pose, betas, cam_t, moved)
    expected = 100 ** 2 * 10 ** 2 / (100 ** 2 + 10 ** 2)
    assert joint_loss[0, 30].item() == pytest.approx(expected, rel=1e-3)
    assert joint_loss[1, 30].item() == pytest.approx(0.25 * expected, rel=1e-3)
    assert joint_loss[:, FIT_IGNORED[0]].abs().max() < 1e-6
    torch.testing.assert_close(loss, joint_loss.mean(-1))
    assert loss[0].item() == pytest.approx(expected / 49, rel=1e-2)
    assert moved[0, FIT_IGNORED[0], 2] == 1.0  # confidences are not zeroed in place


def test_body_residuals_square_to_smplify_energy(model, prior):
    pose, betas, cam_t, joints3d, kp = synthetic(model, 3, seed=9)
    kp = kp.clone()
    kp[..., :2] += 30.0 * torch.randn(kp[..., :2].shape, generator=torch.Generator().manual_seed(0))
    kp[:, :, 2] = torch.rand(3, 49, generator=torch.Generator().manual_seed(1))
    conf = fit_confidence(kp[..., 2])
    weights = dict(sigma=100.0, pose_prior_weight=4.78, angle_prior_weight=15.2, shape_prior_weight=5.0,
                   focal_length=5000.0, img_res=224)
    args = (joints3d, pose[:, 3:], betas, cam_t, kp, conf, prior)
    energy = body_residuals(*args, **weights).square().sum(-1)
    terms = body_energy_terms(*args, **weights)
    torch.testing.assert_close(energy, sum(terms.values()), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(terms["pose_prior"], 4.78 ** 2 * prior(pose[:, 3:]))
    torch.testing.assert_close(terms["angle_prior"], 15.2 ** 2 * angle_prior(pose[:, 3:]))
    torch.testing.assert_close(terms["shape_prior"], 25.0 * betas.square().sum(-1))
    projected = perspective_projection(joints3d, cam_t)
    data = (conf ** 2 * gmof(projected - kp[..., :2], 100.0).sum(-1)).sum(-1)
    torch.testing.assert_close(terms["data"], data)


def test_fit_confidence_is_pure():
    conf = torch.ones(3, 49)
    out = fit_confidence(conf)
    assert conf.min() == 1.0 and out[:, list(FIT_IGNORED)].abs().max() == 0.0 and out.sum() == 3 * 44


def test_keypoint_body_matches_the_full_model(posable):
    rng = np.random.default_rng(1)
    pose = torch.as_tensor(rng.normal(scale=0.5, size=(4, 72)), dtype=torch.float32)
    betas = torch.as_tensor(rng.normal(size=(4, 10)), dtype=torch.float32)
    body = KeypointBody(posable)
    assert body.num_support < 21 + 9 * 20 + 1
    with torch.no_grad():
        full = posable(pose, betas)
        torch.testing.assert_close(body(pose, betas), full.keypoints, atol=2e-5, rtol=1e-4)
        rotmats = roma.rotvec_to_rotmat(pose.reshape(4, 24, 3))
        torch.testing.assert_close(body(rotmats, betas), full.keypoints, atol=2e-5, rtol=1e-4)


def test_rigid_camera_stage_keypoints_match_the_model(posable):
    rng = np.random.default_rng(0)
    body_pose = torch.as_tensor(sample_body_poses(3, rng))
    betas = torch.as_tensor(rng.normal(size=(3, 10)), dtype=torch.float32)
    orient = torch.as_tensor(rng.normal(size=(3, 3)), dtype=torch.float32)
    keypoints = rigid_keypoints(KeypointBody(posable), body_pose, betas)(orient)
    with torch.no_grad():
        direct = posable(torch.cat([orient, body_pose], 1), betas).keypoints
    torch.testing.assert_close(keypoints, direct, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- solvers

def test_adam_keeps_the_best_iterate_per_sample():
    target = torch.tensor([[1.0], [-2.0], [0.5]])
    problem = StageProblem({"x": torch.zeros(3, 1)}, ("x",), lambda p, rows=None: p["x"] - target,
                           torch.tensor([True, True, False]))
    wild = StageConfig("body", iterations=7, lr=3.0)   # overshoots, so the last step is not the best
    result = adam(problem, wild)
    trajectory = [torch.zeros(3, 1)]
    x = torch.zeros(3, 1, requires_grad=True)
    opt = torch.optim.Adam([x], lr=3.0)
    for _ in range(7):
        opt.zero_grad()
        ((x - target).square().sum(-1) * torch.tensor([1.0, 1.0, 0.0])).sum().backward()
        opt.step()
        trajectory.append(x.detach().clone())
    energies = torch.stack([(t - target).square().sum(-1) for t in trajectory])
    torch.testing.assert_close(result.energy, energies.min(0).values)
    assert (result.energy[:2] < energies[-1][:2]).any()
    assert result.params["x"][2].item() == 0.0          # inactive: untouched
    assert result.iterations.tolist() == [7, 7, 0]
    # SPIN's own: the last iterate, whatever its energy
    last = adam(problem, StageConfig("body", iterations=7, lr=3.0, options={"last_iterate": 1}))
    torch.testing.assert_close(last.params["x"][:2], trajectory[-1][:2])
    torch.testing.assert_close(last.energy[:2], energies[-1][:2])


def test_a_registered_solver_is_used_by_name(model, prior):
    calls = []

    def frozen(problem, stage):
        calls.append(stage.name)
        return adam(problem, StageConfig(stage.name, iterations=0))

    register_solver("frozen", frozen)
    try:
        _, _, _, _, kp = synthetic(model, 2, seed=2)
        config = SmplifyConfig(stages=[StageConfig("camera", 5, solver="frozen"), StageConfig("body", 3)])
        result = fit(model, prior, kp, config=config)
    finally:
        SOLVERS.pop("frozen")
    assert calls == ["camera"]
    assert result.iterations.tolist() == [3, 3]


def test_stage_residuals_for_a_subset_of_samples(model, prior):
    pose, betas, cam_t, _, kp = synthetic(model, 4, seed=12)
    params = {"global_orient": pose[:, :3], "body_pose": pose[:, 3:], "betas": betas, "cam_t": cam_t + 0.1}
    rows = torch.tensor([3, 1])
    config = SmplifyConfig()
    for stage in config.stages:
        residuals = _stage_residuals(stage, KeypointBody(model), prior, kp, fit_confidence(kp[..., 2]), cam_t,
                                     params, config)
        full = residuals(params)
        torch.testing.assert_close(residuals({k: v[rows] for k, v in params.items()}, rows), full[rows])
        assert full.shape == ((4, 9) if stage.name == "camera" else (4, 98 + 70 + 4 + 10))


# ---------------------------------------------------------------- fitting

def test_mean_init_recovers_the_camera_of_the_mean_body(model, prior):
    mean_pose = default_mean_pose(prior)
    cam_t = torch.tensor([[0.1, -0.05, 50.0], [0.0, 0.02, 60.0]])
    with torch.no_grad():
        joints3d = model(mean_pose[None].expand(2, -1), torch.zeros(2, 10)).keypoints
    kp = torch.cat([perspective_projection(joints3d, cam_t), torch.ones(2, 49, 1)], -1)
    init = mean_init(model, kp, mean_pose, torch.zeros(10))
    torch.testing.assert_close(init.cam_t, cam_t, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(init.cam_t, estimate_translation(joints3d, kp))
    assert init.pose.shape == (2, 72) and init.betas.shape == (2, 10)


def test_fit_clean_keypoints_far_better_than_the_mean_pose(human, prior):
    pose, betas, cam_t, joints3d, kp = synthetic(human, 8, seed=3)
    init = mean_init(human, kp, default_mean_pose(prior), torch.zeros(10))
    init_loss, _ = score(human, prior, init.pose, init.betas, init.cam_t, kp)
    result = fit(human, prior, kp, init=init)
    assert result.valid.all() and result.reasons == [None] * 8
    assert ((result.iterations > 0) & (result.iterations <= 12 + 20)).all()  # LM stops per sample
    assert result.loss.median() < 10.0 and (result.loss < 0.2 * init_loss).all()
    fitted = pa_mpjpe_mm(human, result.pose, result.betas, joints3d)
    start = pa_mpjpe_mm(human, init.pose, init.betas, joints3d)
    assert fitted.median() < 0.6 * start.median()  # a sample may land in a local minimum


def test_init_near_truth_beats_init_from_the_mean(human, prior):
    model = human
    pose, betas, cam_t, joints3d, kp = synthetic(model, 8, seed=4)
    gen = torch.Generator().manual_seed(0)
    near = FitInit(pose + 0.1 * torch.randn(pose.shape, generator=gen), betas, cam_t * 1.02)
    from_mean = fit(model, prior, kp, config=short())
    from_near = fit(model, prior, kp, init=near, config=short())
    assert pa_mpjpe_mm(model, from_near.pose, from_near.betas, joints3d).mean() < \
        pa_mpjpe_mm(model, from_mean.pose, from_mean.betas, joints3d).mean()
    assert from_near.loss.mean() < from_mean.loss.mean()


@pytest.mark.fault("bad samples inside a SMPLify batch (NaN keypoints, non-finite init, no keypoints)",
                   "flagged with a reason; the rest fit as if alone; the caller's tensors unchanged")
def test_bad_samples_are_flagged_and_the_rest_fits_as_if_alone(model, prior):
    pose, betas, cam_t, _, kp = synthetic(model, 5, seed=5)
    kp = kp.clone()
    kp[1, 7, 0] = float("nan")
    kp[3, :, 2] = 0.0
    init = FitInit(pose.clone(), betas.clone(), cam_t.clone())
    init.cam_t[2, 1] = float("inf")
    kp_before, init_before = kp.clone(), FitInit(init.pose.clone(), init.betas.clone(), init.cam_t.clone())
    config = short(20, 30)
    result = fit(model, prior, kp, init=init, config=config)
    assert result.reasons == [None, "non-finite keypoints", "non-finite init", "no detected keypoints", None]
    assert result.valid.tolist() == [True, False, False, False, True]
    assert torch.isinf(result.loss[1:4]).all() and result.iterations.tolist() == [50, 0, 0, 0, 50]
    assert torch.isfinite(result.pose).all() and torch.isfinite(result.cam_t).all()
    keep = [0, 4]
    alone = fit(model, prior, kp[keep], init=FitInit(pose[keep], betas[keep], cam_t[keep]), config=config)
    torch.testing.assert_close(result.pose[keep], alone.pose, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.loss[keep], alone.loss, atol=1e-3, rtol=1e-3)
    # the caller's tensors are untouched (no confidence zeroed in place, no NaN cleaned)
    torch.testing.assert_close(kp, kp_before, equal_nan=True)
    for name in ("pose", "betas", "cam_t"):
        torch.testing.assert_close(getattr(init, name), getattr(init_before, name), equal_nan=True)


def test_inputs_unchanged_and_betas_guard(model, prior):
    pose, betas, cam_t, _, kp = synthetic(model, 3, seed=6)
    big = betas.clone()
    big[0, 0] = 5.0
    init = FitInit(pose.clone(), big.clone(), cam_t.clone())
    clones = [t.clone() for t in (kp, init.pose, init.betas, init.cam_t)]
    prior_means = prior.means.clone()
    camera_only = SmplifyConfig(stages=[StageConfig("camera", 5)])
    result = fit(model, prior, kp, init=init, config=camera_only)
    for before, after in zip(clones, (kp, init.pose, init.betas, init.cam_t)):
        assert torch.equal(before, after)
    assert torch.equal(prior.means, prior_means)
    assert result.betas_ok.tolist() == [False, True, True]
    torch.testing.assert_close(result.pose[:, 3:], pose[:, 3:])   # the camera stage leaves the body alone


def test_fit_rejects_malformed_input(model, prior):
    with pytest.raises(BadInput, match="keypoints"):
        fit(model, prior, torch.zeros(2, 24, 3))
    _, _, _, _, kp = synthetic(model, 2, seed=7)
    with pytest.raises(BadInput, match="init betas"):
        fit(model, prior, kp, init=FitInit(torch.zeros(2, 72), torch.zeros(2, 11), torch.ones(2, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_matches_cpu(model, prior):
    _, _, _, _, kp = synthetic(model, 4, seed=8)
    config = short(20, 20)
    on_cpu = fit(model, prior, kp, config=config)
    on_gpu = fit(BodyModel(make_toy_smpl(seed=0)).cuda(), prior, kp, config=config)
    assert on_gpu.pose.device.type == "cuda"
    torch.testing.assert_close(on_gpu.loss.cpu(), on_cpu.loss, rtol=1e-2, atol=1e-2)


def test_gmof_matches_spin_units():
    # the reported loss at a joint 100 px off is half of sigma^2 (per coordinate)
    assert gmof(torch.tensor(100.0), 100.0).item() == pytest.approx(5000.0)


def test_loss_threshold_decides_validity(model, prior):
    pose, betas, cam_t, _, kp = synthetic(model, 2, seed=10)
    truth = FitInit(pose, betas, cam_t)
    scrambled = kp.clone()
    scrambled[1, :, :2] = 224 * torch.rand(49, 2, generator=torch.Generator().manual_seed(0))
    result = fit(model, prior, scrambled, init=truth, config=short(10, 10))
    assert result.loss[0] < 100.0 < result.loss[1] and result.valid.tolist() == [True, False]
    assert result.reasons == [None, None]   # a poor fit, not an unfittable sample
    lenient = SmplifyConfig(stages=short(10, 10).stages, loss_threshold=1e9)
    assert fit(model, prior, scrambled, init=truth, config=lenient).valid.all()
