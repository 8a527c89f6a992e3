"""Batched SMPLify as in SPIN: a camera stage (global orientation and camera translation on the
torso) then a body stage (pose, shape and orientation against all keypoints with the GMM, angle
and shape priors), both solved by Levenberg-Marquardt by default (`solver: adam` is SPIN's own).

Stages are data (`SmplifyConfig.stages`) run by one loop; each names its solver. A sample whose
keypoints or initialization are not finite is marked invalid with a reason and left out of the
optimization while the rest of the batch is fitted.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from fitting.body_model import BodyModel
from fitting.camera import FOCAL_LENGTH, IMG_RES, estimate_translation, perspective_projection
from fitting.errors import BadInput
from fitting.keypoint_body import KeypointBody, MeshKeypoints, rigid_keypoints
from fitting.keypoints import NUM_KEYPOINTS
from fitting.linearize import LOCAL_ROTATIONS, body_system, camera_system
from fitting.objective import (
    body_residuals,
    camera_residuals,
    fit_confidence,
    reprojection_loss,
)
from fitting.priors import GMMPrior
from fitting.settings import Settings
from fitting.solvers import SOLVERS, StageProblem, get_solver
from fitting.stages import PARAMETERS, StageConfig, default_stages

FORWARDS = ("keypoints", "mesh")


@dataclass
class SmplifyConfig(Settings):
    """SPIN's SMPLify settings; weights are the square roots of the energy weights, as in SPIN."""
    SECTION = "smplify"

    stages: list[StageConfig] = field(default_factory=default_stages)
    sigma: float = 100.0
    pose_prior_weight: float = 4.78
    angle_prior_weight: float = 15.2
    shape_prior_weight: float = 5.0
    depth_weight: float = 100.0
    loss_threshold: float = 100.0
    betas_threshold: float = 3.0
    focal_length: float = FOCAL_LENGTH
    img_res: int = IMG_RES
    # 'keypoints' skins only the vertices the keypoints use; 'mesh' skins the whole mesh at every
    # step, as SPIN does. Both give the same keypoints; 'mesh' is there to compare speed with SPIN.
    forward: str = "keypoints"

    def __post_init__(self) -> None:
        unknown = [s.solver for s in self.stages if s.solver not in SOLVERS]
        if unknown:
            raise BadInput(f"unknown solver '{unknown[0]}' (known: {', '.join(sorted(SOLVERS))})")
        if self.forward not in FORWARDS:
            raise BadInput(f"'forward' must be one of {', '.join(FORWARDS)}, got {self.forward!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("stages", "forward") and not (np.isfinite(value) and value >= 0):
                raise BadInput(f"'{f.name}' must be a finite number >= 0, got {value!r}")
        if self.sigma <= 0 or self.focal_length <= 0 or self.img_res <= 0:
            raise BadInput("sigma, focal_length and img_res must be > 0")

    def with_solver(self, solver: str) -> "SmplifyConfig":
        """These settings with every stage solved by `solver` ('' keeps each stage's own)."""
        if not solver:
            return self
        return replace(self, stages=[replace(stage, solver=solver) for stage in self.stages])


@dataclass
class FitInit:
    pose: torch.Tensor    # (B, 72) axis-angle
    betas: torch.Tensor   # (B, 10)
    cam_t: torch.Tensor   # (B, 3)


@dataclass
class FitResult:
    pose: torch.Tensor        # (B, 72)
    betas: torch.Tensor       # (B, 10)
    cam_t: torch.Tensor       # (B, 3)
    loss: torch.Tensor        # (B,) mean over the 49 keypoints of conf^2 * gmof (inf when not fitted)
    joint_loss: torch.Tensor  # (B, 49)
    iterations: torch.Tensor  # (B,) long
    valid: torch.Tensor       # (B,) bool: fitted and loss < threshold
    betas_ok: torch.Tensor    # (B,) bool: all |beta| <= betas_threshold
    reasons: list[str | None]  # why a sample could not be fitted at all


def _device(model: BodyModel) -> torch.device:
    return next(model.buffers()).device


def check_keypoints(keypoints_px: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(keypoints_px) or keypoints_px.ndim != 3 or keypoints_px.shape[1:] != (NUM_KEYPOINTS, 3):
        shape = tuple(keypoints_px.shape) if torch.is_tensor(keypoints_px) else type(keypoints_px).__name__
        raise BadInput(f"keypoints must be a (B, {NUM_KEYPOINTS}, 3) tensor of pixels and confidence, got {shape}")
    return keypoints_px


def mean_init(model: BodyModel, keypoints_px: torch.Tensor, mean_pose: torch.Tensor, mean_betas: torch.Tensor,
              focal_length: float = FOCAL_LENGTH, img_res: int = IMG_RES) -> FitInit:
    """Every sample starts at the mean pose and shape; the camera comes from the keypoints
    (weighted least squares on the mean body's keypoints, all samples at once)."""
    kp = check_keypoints(keypoints_px).to(_device(model), torch.float32)
    batch = kp.shape[0]
    pose = torch.as_tensor(mean_pose, dtype=torch.float32, device=kp.device).reshape(1, 72)
    betas = torch.as_tensor(mean_betas, dtype=torch.float32, device=kp.device).reshape(1, 10)
    with torch.no_grad():
        joints3d = model(pose, betas).keypoints.expand(batch, -1, -1)
        cam_t = estimate_translation(joints3d, kp, focal_length, img_res)
    return FitInit(pose.expand(batch, -1).clone(), betas.expand(batch, -1).clone(), cam_t)


def default_mean_pose(prior: GMMPrior) -> torch.Tensor:
    """(72,) upright in SPIN's camera frame (pi about x) with the prior's mean body pose."""
    orient = torch.tensor([np.pi, 0.0, 0.0], device=prior.means.device)
    return torch.cat([orient, prior.mean()])


def score(model: BodyModel, prior: GMMPrior | None, pose: torch.Tensor, betas: torch.Tensor, cam_t: torch.Tensor,
          keypoints_px: torch.Tensor, config: SmplifyConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SPIN's reported fitting loss of given parameters under given keypoints: (loss (B,),
    joint_loss (B, 49)); loss is the mean over the 49 keypoints of conf^2 * gmof, with the
    FIT_IGNORED keypoints at zero. Non-finite inputs score inf. `prior` is accepted so that
    score and fit take the same arguments; like SPIN's, the reported loss has no prior term."""
    config = config or SmplifyConfig()
    device = _device(model)
    kp = check_keypoints(keypoints_px).to(device, torch.float32)
    pose, betas, cam_t = (t.to(device, torch.float32) for t in (pose, betas, cam_t))
    with torch.no_grad():
        model_kp = KeypointBody(model)(pose, betas)
        projected = perspective_projection(model_kp, cam_t, config.focal_length, img_res=config.img_res)
        joint = reprojection_loss(projected, kp, fit_confidence(kp[..., 2]), config.sigma)
    finite = torch.isfinite(joint).all(dim=-1)
    joint = torch.where(finite[:, None], joint, float("inf"))
    return joint.mean(dim=-1), joint


def _screen(kp: torch.Tensor, init: FitInit) -> tuple[torch.Tensor, list[str | None]]:
    """(B,) bool of samples that cannot be fitted, and the reason for each."""
    checks = [
        (~torch.isfinite(kp).all(dim=(1, 2)), "non-finite keypoints"),
        (~(torch.isfinite(init.pose).all(-1) & torch.isfinite(init.betas).all(-1)
           & torch.isfinite(init.cam_t).all(-1)), "non-finite init"),
        ((kp[..., 2] < 0).any(dim=1), "negative keypoint confidence"),
        (~(fit_confidence(torch.nan_to_num(kp[..., 2])) > 0).any(dim=1), "no detected keypoints"),
        (~(init.cam_t[:, 2] > 0), "init camera not in front of the image plane"),
    ]
    bad = torch.zeros(kp.shape[0], dtype=torch.bool, device=kp.device)
    reasons: list[str | None] = [None] * kp.shape[0]
    for mask, reason in checks:
        for i in torch.nonzero(mask & ~bad).flatten().tolist():
            reasons[i] = reason
        bad |= mask
    return bad, reasons


def _check_init(init: FitInit, batch: int, device: torch.device) -> FitInit:
    shapes = {"pose": 72, "betas": 10, "cam_t": 3}
    out = {}
    for name, width in shapes.items():
        value = getattr(init, name)
        if not torch.is_tensor(value) or tuple(value.shape) != (batch, width):
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise BadInput(f"init {name} must be a ({batch}, {width}) tensor, got {got}")
        out[name] = value.to(device, torch.float32)
    return FitInit(**out)


def _stage_residuals(stage: StageConfig, body: KeypointBody | MeshKeypoints, prior: GMMPrior, kp: torch.Tensor,
                     confidence: torch.Tensor, cam_t_init: torch.Tensor, params: dict, config: SmplifyConfig):
    """The stage's residual function (params, rows=None) -> (R, M) for the samples `rows`
    (default: all), with params holding just those samples."""
    rigid = None
    if isinstance(body, KeypointBody) and set(stage.optimize) <= {"global_orient", "cam_t"}:
        rigid = rigid_keypoints(body, params["body_pose"], params["betas"])

    def model_keypoints(p: dict, rows: torch.Tensor | None) -> torch.Tensor:
        if rigid is not None:
            return rigid(p["global_orient"], rows)
        return body(torch.cat([p["global_orient"], p["body_pose"]], dim=1), p["betas"])

    def pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return t if rows is None else t[rows]

    f, res = config.focal_length, config.img_res
    if stage.name == "camera":
        def camera(p: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
            return camera_residuals(model_keypoints(p, rows), p["cam_t"], pick(cam_t_init, rows), pick(kp, rows),
                                    config.depth_weight, f, res)
        return camera

    def body_stage(p: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
        return body_residuals(
            model_keypoints(p, rows), p["body_pose"], p["betas"], p["cam_t"], pick(kp, rows), pick(confidence, rows),
            prior, config.sigma, config.pose_prior_weight, config.angle_prior_weight, config.shape_prior_weight, f, res)
    return body_stage


def _stage_system(stage: StageConfig, body: KeypointBody | MeshKeypoints, prior: GMMPrior, kp: torch.Tensor,
                  confidence: torch.Tensor, cam_t_init: torch.Tensor, params: dict, config: SmplifyConfig):
    """The stage's Gauss-Newton system in closed form (see fitting.linearize), or None (then a
    solver that needs one differentiates the residuals)."""
    if not isinstance(body, KeypointBody):
        return None
    f, res = config.focal_length, config.img_res
    if stage.name == "camera":
        return camera_system(body, kp, cam_t_init, params, stage.optimize, config.depth_weight, f, res)
    return body_system(body, prior, kp, confidence, stage.optimize, config.sigma, config.pose_prior_weight,
                       config.angle_prior_weight, config.shape_prior_weight, f, res)


def fit(model: BodyModel, prior: GMMPrior, keypoints_px: torch.Tensor, init: FitInit | None = None,
        config: SmplifyConfig | None = None) -> FitResult:
    """Fit the body model to (B, 49, 3) keypoints in crop pixels (with confidence).

    init None starts from `default_mean_pose(prior)` and zero betas with the camera guessed from
    the keypoints. Runs on the model's device; the inputs are never modified."""
    config = config or SmplifyConfig()
    device = _device(model)
    kp_in = check_keypoints(keypoints_px).to(device, torch.float32)
    if prior.means.device != device:
        prior = copy.deepcopy(prior).to(device)
    batch = kp_in.shape[0]
    if init is None:
        init = mean_init(model, kp_in, default_mean_pose(prior), torch.zeros(10), config.focal_length, config.img_res)
    init = _check_init(init, batch, device)
    bad, reasons = _screen(kp_in, init)

    # Unfittable samples get harmless stand-ins (no keypoints, a neutral start) so that they
    # cannot spread NaNs; their energy is weighted out and their result marked invalid.
    kp = torch.where(bad[:, None, None], 0.0, kp_in)
    stand_in = torch.tensor([np.pi, 0, 0, 0, 0, 2 * config.focal_length / (0.9 * config.img_res)], device=device)
    start = {
        "global_orient": torch.where(bad[:, None], stand_in[:3], init.pose[:, :3]),
        "body_pose": torch.where(bad[:, None], 0.0, init.pose[:, 3:]),
        "betas": torch.where(bad[:, None], 0.0, init.betas),
        "cam_t": torch.where(bad[:, None], stand_in[3:], init.cam_t),
    }
    params = {k: v.detach().clone() for k, v in start.items()}
    body = KeypointBody(model) if config.forward == "keypoints" else MeshKeypoints(model)
    confidence = fit_confidence(kp[..., 2])
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    for stage in config.stages:
        residuals = _stage_residuals(stage, body, prior, kp, confidence, start["cam_t"], params, config)
        system = _stage_system(stage, body, prior, kp, confidence, start["cam_t"], params, config)
        problem = StageProblem(params, stage.optimize, residuals, ~bad, system, LOCAL_ROTATIONS)
        result = get_solver(stage.solver)(problem, stage)
        params = {k: result.params[k].detach() for k in PARAMETERS}
        iterations = iterations + result.iterations

    pose = torch.cat([params["global_orient"], params["body_pose"]], dim=1)
    loss, joint_loss = score(model, prior, pose, params["betas"], params["cam_t"], kp, config)
    loss = torch.where(bad, float("inf"), loss)
    joint_loss = torch.where(bad[:, None], float("inf"), joint_loss)
    betas_ok = ~bad & (params["betas"].abs() <= config.betas_threshold).all(dim=-1)
    return FitResult(
        pose=pose, betas=params["betas"], cam_t=params["cam_t"], loss=loss, joint_loss=joint_loss,
        iterations=iterations, valid=~bad & (loss < config.loss_threshold), betas_ok=betas_ok, reasons=reasons,
    )
