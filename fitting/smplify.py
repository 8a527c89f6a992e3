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
from fitting.fit_graph import FitGraphs
from fitting.keypoint_body import KeypointBody, MeshKeypoints, rigid_keypoints
from fitting.keypoints import NUM_KEYPOINTS
from fitting.keypoint_jacobian import KeypointJacobian
from fitting.linearize import LOCAL_ROTATIONS, body_jacobian, body_system, camera_system
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
MODES = ("auto", "dynamic", "static", "graph")
Tensors = dict[str, torch.Tensor]


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
    # How LM stages run (the same steps in each; see fitting.lm): 'dynamic' drops stopped samples
    # from later steps, which saves a CPU their work; 'static' evaluates every sample at every step
    # with fixed shapes and no host synchronisation; 'graph' records the static fit once per batch
    # size as a CUDA graph and replays it. 'auto': 'dynamic' on a CPU; on a GPU 'graph' where the
    # fit can be recorded (every stage 'lm', forward 'keypoints') and replayed (a Smplify kept for
    # many batches, not a one-off `fit`), else 'static'; see also graph_batch_max.
    mode: str = "auto"
    # On a GPU in mode 'auto', a batch of more than this many samples runs 'dynamic' instead of the
    # graph: there the work, not the kernel launches, sets the time, and the fixed-shape fit works
    # on every sample to the last step. On an H200 (bench/results/smplify_h200.json) 'dynamic' fit
    # 1.8-2.0x the graph's rate at 16384 and 2.6-3.2x at 65536; the graph 1.3-1.9x dynamic's at 4096.
    graph_batch_max: int = 8192
    # On a GPU in mode 'auto', a batch of at most this many samples is fitted on the CPU (mode
    # 'dynamic'; FitResult.device says so): a GPU fit is thousands of small kernels, about as long
    # for one sample as for hundreds, while a CPU's time grows with the batch. 0: never.
    cpu_batch_max: int = 1

    def __post_init__(self) -> None:
        unknown = [s.solver for s in self.stages if s.solver not in SOLVERS]
        if unknown:
            raise BadInput(f"unknown solver '{unknown[0]}' (known: {', '.join(sorted(SOLVERS))})")
        if self.forward not in FORWARDS:
            raise BadInput(f"'forward' must be one of {', '.join(FORWARDS)}, got {self.forward!r}")
        if self.mode not in MODES:
            raise BadInput(f"'mode' must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("cpu_batch_max", "graph_batch_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise BadInput(f"'{name}' must be an integer >= 0, got {value!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("stages", "forward", "mode") and not (np.isfinite(value) and value >= 0):
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
    mode: str = ""            # how the LM stages ran: SmplifyConfig.mode with 'auto' resolved
    device: str = ""          # where they ran ('cpu' for a small batch routed there from a GPU)


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
    return _score(KeypointBody(model), pose, betas, cam_t, kp, config)


@torch.no_grad()
def _score(body: KeypointBody, pose: torch.Tensor, betas: torch.Tensor, cam_t: torch.Tensor, kp: torch.Tensor,
           config: SmplifyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    projected = perspective_projection(body(pose, betas), cam_t, config.focal_length, img_res=config.img_res)
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
    masks = torch.stack([mask for mask, _ in checks])
    reasons: list[str | None] = [None] * kp.shape[0]
    for row, (_, reason) in zip(masks.cpu(), checks):                # one read-back for all the reasons
        for i in torch.nonzero(row).flatten().tolist():
            reasons[i] = reasons[i] or reason                       # the first check that fails names it
    return masks.any(dim=0), reasons


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
                  confidence: torch.Tensor, cam_t_init: torch.Tensor, params: dict, config: SmplifyConfig,
                  jacobian: KeypointJacobian | None = None):
    """The stage's Gauss-Newton system in closed form (see fitting.linearize), or None (then a
    solver that needs one differentiates the residuals). `jacobian`: body_jacobian(body), if built."""
    if not isinstance(body, KeypointBody):
        return None
    f, res = config.focal_length, config.img_res
    if stage.name == "camera":
        return camera_system(body, kp, cam_t_init, params, stage.optimize, config.depth_weight, f, res)
    return body_system(body, prior, kp, confidence, stage.optimize, config.sigma, config.pose_prior_weight,
                       config.angle_prior_weight, config.shape_prior_weight, f, res, jacobian)


def resolve_mode(config: SmplifyConfig, device: torch.device, reuse: bool = True) -> str:
    """config.mode with 'auto' resolved for `device` and for a fitter used for one batch or
    several (`reuse`: a graph recorded for a single fit costs more than it saves); BadInput where
    'graph' cannot run."""
    capturable = config.forward == "keypoints" and all(stage.solver == "lm" for stage in config.stages)
    if config.mode == "auto":
        return "dynamic" if device.type != "cuda" else "graph" if capturable and reuse else "static"
    if config.mode == "graph" and (device.type != "cuda" or not capturable):
        raise BadInput("smplify: mode 'graph' needs a CUDA device, forward 'keypoints' and every stage solved by "
                       f"'lm' (device {device}, forward {config.forward!r}, solvers "
                       f"{[stage.solver for stage in config.stages]})")
    return config.mode


def mode_for_batch(config: SmplifyConfig, mode: str, batch: int) -> str:
    """The mode for a batch of `batch` samples of a fitter whose mode resolved to `mode`:
    'dynamic' for a graph's batch larger than config.graph_batch_max in mode 'auto'."""
    if mode == "graph" and config.mode == "auto" and batch > config.graph_batch_max:
        return "dynamic"
    return mode


class Smplify:
    """Fits with one body model, prior and configuration: `Smplify(model, prior, config)(keypoints_px,
    init)` -> FitResult, as `fit`. It keeps what the fits of many batches share: the keypoint body,
    its Jacobian and, in mode 'graph', the recorded CUDA graphs (see fitting.fit_graph). `reuse`
    False (one batch only) makes mode 'auto' fit without recording a graph."""

    def __init__(self, model: BodyModel, prior: GMMPrior, config: SmplifyConfig | None = None, reuse: bool = True):
        self.config = config or SmplifyConfig()
        self.model = model
        self.device = _device(model)
        self.prior = prior if prior.means.device == self.device else copy.deepcopy(prior).to(self.device)
        self.mode = resolve_mode(self.config, self.device, reuse)
        self.scorer = KeypointBody(model)
        self.body = self.scorer if self.config.forward == "keypoints" else MeshKeypoints(model)
        self.jacobian = body_jacobian(self.scorer) if self.config.forward == "keypoints" else None
        self.stand_in = stand_in_sample(self.config, self.device)
        self.graphs = FitGraphs(self.fit_screened, self.device) if self.mode == "graph" else None
        self.on_cpu: Smplify | None = None   # made for the first small batch routed to the CPU

    def __call__(self, keypoints_px: torch.Tensor, init: FitInit | None = None) -> FitResult:
        if self.routes_to_cpu(check_keypoints(keypoints_px).shape[0]):
            return self._fit_on_cpu(keypoints_px, init)
        inputs, reasons = self.screen(keypoints_px, init)
        mode = self.batch_mode(inputs["bad"].shape[0])
        if mode == "graph":
            out = self.graphs(inputs, self.stand_in)
        else:
            out = self.fit_screened(inputs, fixed_shapes=mode != "dynamic")
        return FitResult(**out, reasons=reasons, mode=mode, device=self.device.type)

    def batch_mode(self, batch: int) -> str:
        """How this fitter fits a batch of `batch` samples on its device."""
        return mode_for_batch(self.config, self.mode, batch)

    def routes_to_cpu(self, batch: int) -> bool:
        """Whether a batch of `batch` samples is fitted on the CPU (see SmplifyConfig.cpu_batch_max)."""
        return self.config.mode == "auto" and self.device.type == "cuda" and batch <= self.config.cpu_batch_max

    def _fit_on_cpu(self, keypoints_px: torch.Tensor, init: FitInit | None) -> FitResult:
        if self.on_cpu is None:
            self.on_cpu = Smplify(copy.deepcopy(self.model).cpu(), copy.deepcopy(self.prior).cpu(), self.config)
        if init is not None:
            init = FitInit(*(t.cpu() for t in (init.pose, init.betas, init.cam_t)))
        result = self.on_cpu(keypoints_px.cpu(), init)
        moved = {f.name: getattr(result, f.name).to(self.device) for f in fields(result)
                 if torch.is_tensor(getattr(result, f.name))}
        return FitResult(**moved, reasons=result.reasons, mode=result.mode, device=result.device)

    def screen(self, keypoints_px: torch.Tensor, init: FitInit | None = None) -> tuple[Tensors, list[str | None]]:
        """Checks, the start (`mean_init` where init is None) and the samples that cannot be fitted
        -> (fit_screened's inputs, the reason per sample)."""
        config, device = self.config, self.device
        kp_in = check_keypoints(keypoints_px).to(device, torch.float32)
        if init is None:
            init = mean_init(self.model, kp_in, default_mean_pose(self.prior), torch.zeros(10), config.focal_length,
                             config.img_res)
        init = _check_init(init, kp_in.shape[0], device)
        bad, reasons = _screen(kp_in, init)
        # Unfittable samples get harmless stand-ins (no keypoints, a neutral start) so that they
        # cannot spread NaNs; their energy is weighted out and their result marked invalid.
        stand_in = self.stand_in
        inputs = {
            "keypoints": torch.where(bad[:, None, None], stand_in["keypoints"], kp_in),
            "global_orient": torch.where(bad[:, None], stand_in["global_orient"], init.pose[:, :3]),
            "body_pose": torch.where(bad[:, None], stand_in["body_pose"], init.pose[:, 3:]),
            "betas": torch.where(bad[:, None], stand_in["betas"], init.betas),
            "cam_t": torch.where(bad[:, None], stand_in["cam_t"], init.cam_t),
            "bad": bad,
        }
        return inputs, reasons

    def fit_screened(self, inputs: Tensors, fixed_shapes: bool | None = None) -> Tensors:
        """The fit of screened inputs ((B, 49, 3) keypoints, each parameter's start, (B,) bad) ->
        FitResult's tensors. With fixed shapes (default: unless the fitter's mode is 'dynamic') it
        reads nothing back to the host, and it is what a CUDA graph records."""
        if fixed_shapes is None:
            fixed_shapes = self.mode != "dynamic"
        config, kp, bad = self.config, inputs["keypoints"], inputs["bad"]
        start = {k: inputs[k] for k in PARAMETERS}
        params = dict(start)
        confidence = fit_confidence(kp[..., 2])
        iterations = torch.zeros(kp.shape[0], dtype=torch.long, device=kp.device)
        for stage in config.stages:
            residuals = _stage_residuals(stage, self.body, self.prior, kp, confidence, start["cam_t"], params, config)
            system = _stage_system(stage, self.body, self.prior, kp, confidence, start["cam_t"], params, config,
                                   self.jacobian)
            problem = StageProblem(params, stage.optimize, residuals, ~bad, system, LOCAL_ROTATIONS,
                                   fixed_shapes=fixed_shapes)
            result = get_solver(stage.solver)(problem, stage)
            params = {k: result.params[k].detach() for k in PARAMETERS}
            iterations = iterations + result.iterations

        pose = torch.cat([params["global_orient"], params["body_pose"]], dim=1)
        loss, joint_loss = _score(self.scorer, pose, params["betas"], params["cam_t"], kp, config)
        loss = torch.where(bad, float("inf"), loss)
        joint_loss = torch.where(bad[:, None], float("inf"), joint_loss)
        betas_ok = ~bad & (params["betas"].abs() <= config.betas_threshold).all(dim=-1)
        return {"pose": pose, "betas": params["betas"], "cam_t": params["cam_t"], "loss": loss,
                "joint_loss": joint_loss, "iterations": iterations, "valid": ~bad & (loss < config.loss_threshold),
                "betas_ok": betas_ok}


def stand_in_sample(config: SmplifyConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """One sample that cannot be fitted and harms nothing: no keypoints, upright at the mean
    shape, in front of the camera; each value broadcasts against a batch's (B, ...) rows."""
    depth = 2 * config.focal_length / (0.9 * config.img_res)
    return {"keypoints": torch.zeros(NUM_KEYPOINTS, 3, device=device),
            "global_orient": torch.tensor([np.pi, 0.0, 0.0], device=device),
            "body_pose": torch.zeros(69, device=device), "betas": torch.zeros(10, device=device),
            "cam_t": torch.tensor([0.0, 0.0, depth], device=device),
            "bad": torch.ones((), dtype=torch.bool, device=device)}


def fit(model: BodyModel, prior: GMMPrior, keypoints_px: torch.Tensor, init: FitInit | None = None,
        config: SmplifyConfig | None = None) -> FitResult:
    """Fit the body model to (B, 49, 3) keypoints in crop pixels (with confidence).

    init None starts from `default_mean_pose(prior)` and zero betas with the camera guessed from
    the keypoints. Runs on the model's device; the inputs are never modified. A caller that fits
    many batches keeps a `Smplify` instead, which builds what the fits share once and, on a GPU,
    replays a recorded CUDA graph per batch size (a one-off fit in mode 'auto' is not recorded)."""
    return Smplify(model, prior, config, reuse=False)(keypoints_px, init)
