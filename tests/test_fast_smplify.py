"""Fast SMPLify: the keypoint-only body and its closed-form Jacobian, the stages' Gauss-Newton
systems, the batched Levenberg-Marquardt solver, and its fits against SPIN's Adam."""
from __future__ import annotations

import math

import numpy as np
import pytest
import roma
import torch
from smplx.lbs import batch_rodrigues

from fitting.body_model import BodyModel, load_body_model
from fitting.camera import perspective_projection
from fitting.errors import BadInput
from fitting.geometry import similarity_align
from fitting.keypoint_body import KeypointBody
from fitting.keypoint_jacobian import KeypointJacobian, left_jacobian
from fitting.keypoints import FIT_IGNORED, LSP14
from fitting.lm import LMSettings
from fitting.objective import fit_confidence
from fitting.pose_sampler import sample_body_poses
from fitting.priors import load_prior
from fitting.smplify import FitInit, SmplifyConfig, _stage_residuals, _stage_system, fit, mean_init, score
from fitting.solvers import StageProblem, autodiff_linearize, lm
from tests.toy_body import make_toy_smpl


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def human():
    return load_body_model()


@pytest.fixture(scope="module")
def prior():
    return load_prior()


def people(model, n: int, seed: int, noise_px: float = 2.0, drop: float = 0.1):
    """Poses, shapes and cameras of n people and their noisy keypoints (pixels), some dropped."""
    rng = np.random.default_rng(seed)
    body = torch.as_tensor(sample_body_poses(n, rng))
    turn = torch.as_tensor(np.c_[np.zeros(n), rng.uniform(-0.6, 0.6, n), np.zeros(n)], dtype=torch.float32)
    orient = roma.rotvec_composition([torch.tensor([[math.pi, 0.0, 0.0]]).expand(n, 3), turn])
    pose = torch.cat([orient, body], dim=1)
    betas = torch.as_tensor(rng.normal(size=(n, 10)), dtype=torch.float32)
    cam_t = torch.as_tensor(np.c_[rng.normal(0, 0.03, (n, 2)), 2 * 5000 / (224 * rng.uniform(0.8, 1, n))],
                            dtype=torch.float32)
    with torch.no_grad():
        joints3d = KeypointBody(model)(pose, betas)
    pixels = perspective_projection(joints3d, cam_t) + noise_px * torch.as_tensor(
        rng.standard_normal((n, 49, 2)), dtype=torch.float32)
    seen = torch.as_tensor(rng.random((n, 49)) >= drop, dtype=torch.float32)[..., None]
    return pose, betas, cam_t, joints3d, torch.cat([pixels * seen, seen], dim=-1)


def pa_mpjpe_mm(model, pose, betas, joints3d) -> torch.Tensor:
    with torch.no_grad():
        pred = KeypointBody(model)(pose, betas)[:, LSP14]
    gt = joints3d[:, LSP14]
    return 1000 * (similarity_align(pred, gt) - gt).norm(dim=-1).mean(dim=-1)


def solver_config(solver: str) -> SmplifyConfig:
    data = SmplifyConfig().to_dict()
    data["stages"] = [{**stage, "solver": solver} for stage in data["stages"]]
    return SmplifyConfig.from_dict(data)


# ---------------------------------------------------------------- keypoints and their Jacobian

def test_keypoint_body_equals_the_full_forward_on_the_builtin_and_a_random_model(human, posable):
    rng = np.random.default_rng(2)
    pose = torch.as_tensor(rng.normal(scale=0.4, size=(5, 72)), dtype=torch.float32)
    betas = torch.as_tensor(rng.normal(size=(5, 10)), dtype=torch.float32)
    for model in (human, BodyModel(make_toy_smpl(seed=5)), posable):
        with torch.no_grad():
            torch.testing.assert_close(KeypointBody(model)(pose, betas), model(pose, betas).keypoints,
                                       atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["human", "posable"])
def test_keypoint_jacobian_equals_autograd(which, human, posable):
    model = {"human": human, "posable": posable}[which]
    body = KeypointBody(model).double()
    keys = [k for k in range(49) if k not in FIT_IGNORED]
    jacobian = KeypointJacobian(body, keys)
    assert jacobian.has_correctives == (which == "posable")
    rng = np.random.default_rng(3)
    pose = torch.as_tensor(rng.normal(scale=0.5, size=(3, 72)))
    pose[0, :3] = torch.tensor([math.pi, 0.0, 0.0])   # upright: the axis-angle chart's rim
    pose[1, 3:9] = 0.0                               # joints at rest: Jl's series branch
    betas = torch.as_tensor(rng.normal(size=(3, 10)))
    lin = jacobian(pose, betas)

    def keypoints(p, b):
        return body(p[None], b[None])[0, keys]

    d_pose, d_betas = torch.func.vmap(torch.func.jacfwd(keypoints, argnums=(0, 1)))(pose, betas)
    torch.testing.assert_close(lin.keypoints, body(pose, betas)[:, keys], atol=1e-12, rtol=0)
    torch.testing.assert_close(lin.d_pose(), d_pose, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(lin.d_betas, d_betas, atol=1e-10, rtol=1e-8)
    rows = torch.as_tensor(rng.normal(size=(3, len(keys), 2, 3)))
    torch.testing.assert_close(lin.pull(rows), rows @ d_pose.reshape(3, len(keys), 3, 72), atol=1e-7, rtol=1e-6)

    # with local_root, the root's columns are for exp([d]) R_0: d R_0 = [d] R_0
    def turned(d, p, b):
        rot = batch_rodrigues(p.reshape(24, 3))
        rot = torch.cat([(batch_rodrigues(d[None]) @ rot[:1]), rot[1:]])
        return body(rot[None], b[None])[0, keys]

    local = torch.func.vmap(torch.func.jacfwd(turned))(torch.zeros(3, 3, dtype=torch.float64), pose, betas)
    torch.testing.assert_close(jacobian(pose, betas, local_root=True).d_pose()[..., :3], local, atol=1e-7, rtol=1e-6)


def test_left_jacobian_is_the_derivative_of_the_exponential():
    rotvec = torch.tensor([[0.0, 0.0, 0.0], [1e-4, -2e-4, 0.0], [0.3, -1.2, 0.5], [math.pi, 0.0, 0.0]],
                          dtype=torch.float64)
    for theta in rotvec:
        d_rot = torch.func.jacfwd(lambda v: roma.rotvec_to_rotmat(v))(theta)            # (3, 3, 3)
        rot = roma.rotvec_to_rotmat(theta)
        spin = [d_rot[..., c] @ rot.T for c in range(3)]         # skew matrices [omega_c]
        omega = torch.stack([torch.stack([s[2, 1], s[0, 2], s[1, 0]]) for s in spin], dim=-1)
        torch.testing.assert_close(left_jacobian(theta), omega, atol=1e-6, rtol=1e-6)


def test_the_rotation_composition_of_lm_steps_is_the_product_on_the_shorter_arc():
    gen = torch.Generator().manual_seed(0)
    left, right = 2.0 * torch.randn(200, 3, generator=gen), 2.0 * torch.randn(200, 3, generator=gen)
    left[:3] = 0.0
    right[3:6] = 0.0
    left[6], right[6] = torch.tensor([math.pi, 0.0, 0.0]), torch.tensor([1e-6, 0.0, 0.0])
    out = roma.rotvec_composition([left, right])
    assert (out.norm(dim=-1) <= math.pi + 1e-5).all()
    torch.testing.assert_close(roma.rotvec_to_rotmat(out), roma.rotvec_to_rotmat(left) @ roma.rotvec_to_rotmat(right),
                               atol=2e-6, rtol=0)


# ---------------------------------------------------------------- the stages' Gauss-Newton systems

@pytest.mark.parametrize("stage", [
    {"name": "camera"}, {"name": "body"}, {"name": "body", "optimize": ["body_pose", "cam_t"]},
    {"name": "camera", "optimize": ["cam_t"]},
])
def test_stage_systems_equal_autodiff_of_the_residuals(stage, human, prior):
    pose, betas, cam_t, _, kp = people(human, 4, seed=4)
    kp[1, 25:29, 2] = 0.0                      # the OpenPose torso incomplete: the other torso is used
    params = {"global_orient": pose[:, :3] + 0.1, "body_pose": pose[:, 3:] + 0.1, "betas": betas + 0.3,
              "cam_t": cam_t * 1.05}
    stage_config = SmplifyConfig.from_dict({"stages": [stage]}).stages[0]
    config, body, conf = SmplifyConfig(), KeypointBody(human), fit_confidence(kp[..., 2])
    residuals = _stage_residuals(stage_config, body, prior, kp, conf, cam_t, params, config)
    system = _stage_system(stage_config, body, prior, kp, conf, cam_t, params, config)
    everyone = torch.ones(4, dtype=torch.bool)
    reference = autodiff_linearize(StageProblem(params, stage_config.optimize, residuals, everyone))
    # The system's orientation columns are for left increments: d theta = Jl(theta)^-1 d.
    width = {"global_orient": 3, "body_pose": 69, "betas": 10, "cam_t": 3}
    change = torch.eye(sum(width[k] for k in stage_config.optimize)).repeat(4, 1, 1)
    at = 0
    for name in stage_config.optimize:
        if name == "global_orient":
            change[:, at:at + 3, at:at + 3] = torch.linalg.inv(left_jacobian(params["global_orient"]))
        at += width[name]
    rows = torch.tensor([3, 0, 2])
    for subset in (None, rows):
        part = params if subset is None else {k: v[subset] for k, v in params.items()}
        t = change if subset is None else change[subset]
        gradient, hessian = system(part, subset)
        ref_gradient, ref_hessian = reference(part, subset)
        scale = ref_hessian.abs().amax(dim=(1, 2), keepdim=True)
        torch.testing.assert_close(hessian / scale, t.mT @ ref_hessian @ t / scale, atol=2e-5, rtol=0)
        torch.testing.assert_close(gradient / scale[..., 0], (t.mT @ ref_gradient[..., None])[..., 0] / scale[..., 0],
                                   atol=2e-5, rtol=0)


# ---------------------------------------------------------------- the solver

def rosenbrock_problem(targets: torch.Tensor, active: torch.Tensor) -> StageProblem:
    """Per sample: 10 (y - x^2), (a - x): minimum 0 at x = a, y = a^2."""
    def residuals(p, rows=None):
        a = targets if rows is None else targets[rows]
        x, y = p["xy"].unbind(-1)
        return torch.stack([10.0 * (y - x.square()), a - x], dim=-1)
    return StageProblem({"xy": torch.zeros(len(targets), 2)}, ("xy",), residuals, active)


def test_lm_solves_each_sample_and_stops_it_on_its_own():
    targets = torch.tensor([1.0, -0.5, 2.0, 0.3, 1.5])
    active = torch.tensor([True, True, True, True, False])
    problem = rosenbrock_problem(targets, active)
    start = problem.params["xy"].clone()
    stage = SmplifyConfig.from_dict(
        {"stages": [{"name": "body", "iterations": 100, "options": {"atol": 0.0, "ftol": 1e-9}}]}).stages[0]
    result = lm(problem, stage)
    solution = torch.stack([targets, targets.square()], dim=-1)
    torch.testing.assert_close(result.params["xy"][:4], solution[:4], atol=1e-3, rtol=1e-3)
    assert (result.energy[:4] < 1e-6).all()
    assert result.params["xy"][4].tolist() == [0.0, 0.0] and result.iterations[4] == 0   # inactive: untouched
    assert torch.equal(problem.params["xy"], start)                                       # input not modified
    steps = result.iterations[:4]
    assert (steps > 0).all() and (steps < 100).all() and len(set(steps.tolist())) > 1
    # a sample runs the same steps whether it is fitted with the others or alone
    alone = lm(rosenbrock_problem(targets[2:3], torch.tensor([True])), stage)
    assert alone.iterations.item() == steps[2].item()
    torch.testing.assert_close(alone.params["xy"][0], result.params["xy"][2])


def test_lm_caps_its_steps():
    problem = rosenbrock_problem(torch.tensor([2.0, 1.0]), torch.tensor([True, True]))
    stage = SmplifyConfig.from_dict(
        {"stages": [{"name": "body", "iterations": 50, "options": {"max_iterations": 3}}]}).stages[0]
    assert lm(problem, stage).iterations.max() <= 3


@pytest.mark.parametrize("options, message", [
    ({"damping": 0.0}, "damping > 0"), ({"ftol": -1.0}, "ftol >= 0"), ({"max_iterations": -2}, "max_iterations"),
])
@pytest.mark.fault("bad LM options", "one-line error")
def test_lm_rejects_bad_options(options, message):
    with pytest.raises(BadInput, match=message):
        LMSettings.from_options(options)
    assert LMSettings.from_options({"beta1": 0.5, "ftol": 0.1}).ftol == 0.1   # other solvers' options pass


# ---------------------------------------------------------------- fits

def test_lm_is_the_default_and_adam_stays_selectable():
    assert [s.solver for s in SmplifyConfig().stages] == ["lm", "lm"]
    assert [s.solver for s in solver_config("adam").stages] == ["adam", "adam"]
    assert [s.iterations for s in solver_config("adam").stages] == [100, 100]   # SPIN's budget


def test_lm_fits_at_least_as_well_as_adam(human, prior):
    pose, betas, cam_t, joints3d, kp = people(human, 12, seed=5)
    init = mean_init(human, kp, torch.cat([torch.tensor([math.pi, 0, 0]), prior.mean()]), torch.zeros(10))
    adam = fit(human, prior, kp, init=init, config=solver_config("adam"))
    fast = fit(human, prior, kp, init=init)
    assert fast.reasons == [None] * 12 and fast.valid.sum() >= adam.valid.sum()
    assert fast.loss.mean() <= adam.loss.mean()
    assert pa_mpjpe_mm(human, fast.pose, fast.betas, joints3d).mean() <= \
        pa_mpjpe_mm(human, adam.pose, adam.betas, joints3d).mean()
    steps = fast.iterations
    assert (steps > 0).all() and (steps <= 12 + 20).all() and len(set(steps.tolist())) > 1
    init_loss, _ = score(human, prior, init.pose, init.betas, init.cam_t, kp)
    assert (fast.loss < init_loss).all()


@pytest.mark.fault("bad samples inside a SMPLify batch (NaN keypoints, non-finite init, no keypoints)",
                   "flagged with a reason; the rest fit as if alone; the caller's tensors unchanged")
def test_lm_flags_bad_samples_fits_the_rest_as_if_alone_and_keeps_inputs(human, prior):
    pose, betas, cam_t, _, kp = people(human, 5, seed=6)
    kp[1, 7, 0] = float("nan")
    kp[3, :, 2] = 0.0
    init = FitInit(pose + 0.05, betas, cam_t * 1.02)
    init.cam_t[2, 1] = float("inf")
    before = [t.clone() for t in (kp, init.pose, init.betas, init.cam_t)]
    result = fit(human, prior, kp, init=init)
    assert result.reasons == [None, "non-finite keypoints", "non-finite init", "no detected keypoints", None]
    assert result.valid.tolist() == [True, False, False, False, True]
    assert result.iterations[1:4].tolist() == [0, 0, 0] and (result.iterations[[0, 4]] > 0).all()
    assert torch.isinf(result.loss[1:4]).all() and torch.isfinite(result.pose).all()
    for old, new in zip(before, (kp, init.pose, init.betas, init.cam_t)):
        torch.testing.assert_close(new, old, equal_nan=True, atol=0, rtol=0)
    keep = [0, 4]
    alone = fit(human, prior, kp[keep], init=FitInit(init.pose[keep], init.betas[keep], init.cam_t[keep]))
    assert alone.iterations.tolist() == result.iterations[keep].tolist()
    torch.testing.assert_close(alone.pose, result.pose[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone.loss, result.loss[keep], atol=1e-3, rtol=1e-3)


def test_lm_fits_a_batch_of_one(human, prior):
    _, _, _, _, kp = people(human, 1, seed=7)
    result = fit(human, prior, kp)
    assert result.valid.item() and 0 < result.iterations.item() <= 32
    assert result.pose.shape == (1, 72) and result.loss.item() < 20.0


def test_lm_falls_back_to_autodiff_where_a_stage_has_no_closed_form(human, prior):
    _, _, _, _, kp = people(human, 3, seed=9)
    stages = [{"name": "camera", "optimize": ["global_orient", "cam_t", "betas"], "iterations": 5}]
    config = SmplifyConfig.from_dict({"stages": stages})
    init = mean_init(human, kp, torch.cat([torch.tensor([math.pi, 0, 0]), prior.mean()]), torch.zeros(10))
    params = {"global_orient": init.pose[:, :3], "body_pose": init.pose[:, 3:], "betas": init.betas,
              "cam_t": init.cam_t}
    body, conf = KeypointBody(human), fit_confidence(kp[..., 2])
    assert _stage_system(config.stages[0], body, prior, kp, conf, init.cam_t, params, config) is None
    result = fit(human, prior, kp, init=init, config=config)
    fitted = {"global_orient": result.pose[:, :3], "body_pose": result.pose[:, 3:], "betas": result.betas,
              "cam_t": result.cam_t}
    energy = _stage_residuals(config.stages[0], body, prior, kp, conf, init.cam_t, params, config)
    assert (result.iterations > 0).all() and (result.betas != 0).all(dim=1).any()
    assert (energy(fitted).square().sum(-1) < energy(params).square().sum(-1)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lm_on_cuda_matches_cpu(human, prior):
    _, _, _, _, kp = people(human, 4, seed=8)
    on_cpu = fit(human, prior, kp)
    on_gpu = fit(load_body_model(device="cuda"), prior, kp.cuda())
    assert on_gpu.pose.device.type == "cuda"
    torch.testing.assert_close(on_gpu.loss.cpu(), on_cpu.loss, rtol=2e-2, atol=2e-2)


def test_the_mesh_forward_fits_like_the_keypoint_body(human, prior):
    """forward='mesh' (SPIN's whole-mesh skinning) is the same objective: the same Adam
    trajectory, and for LM (through autodiff and additive rotation steps instead of the
    closed-form system) the same energy reached."""
    _, _, _, _, kp = people(human, 3, seed=21)
    for solver, steps in (("adam", 15), ("lm", 6)):
        data = solver_config(solver).to_dict()
        data["stages"] = [{**stage, "iterations": steps, "options": {"max_iterations": steps}} for stage in data["stages"]]
        results = {name: fit(human, prior, kp, config=SmplifyConfig.from_dict({**data, "forward": name}))
                   for name in ("keypoints", "mesh")}
        mesh, fast = results["mesh"], results["keypoints"]
        if solver == "adam":
            torch.testing.assert_close(batch_rodrigues(mesh.pose.reshape(-1, 3)),
                                       batch_rodrigues(fast.pose.reshape(-1, 3)), atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(mesh.loss, fast.loss, atol=1e-2, rtol=1e-3)
        else:
            torch.testing.assert_close(mesh.loss, fast.loss, atol=0.5, rtol=0.1)
    with pytest.raises(BadInput, match="forward"):
        SmplifyConfig(forward="vertices")
