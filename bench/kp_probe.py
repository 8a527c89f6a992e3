"""Prototype: a keypoint-input regressor (49 2D keypoints -> MLP -> HMR's IEF head) trained with
SPIN's losses on fits, on the ground truth or on 2D keypoints alone, and SMPLify from its
predictions. Everything runs on in-memory tensors: the augmentation is batched in torch.

A library for the probes (`bench/kp_experiments.py`); it imports the project read-only.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fitting.body_model import load_body_model
from fitting.camera import FOCAL_LENGTH, IMG_RES, normalized_to_pixels
from fitting.geometry import pose_to_rotmat, rotmat_to_pose, sixd_to_rotmat
from fitting.keypoint_body import KeypointBody
from fitting.keypoints import FLIP_PERM, GT24, LSP14, OP25, SMPL_FLIP_PERM
from fitting.priors import angle_prior, load_prior, shape_prior
from trainer.losses import LossWeights, betas_loss, camera_loss, keypoint_loss, masked_mean, pose_loss, project_keypoints
from trainer.mean_params import load_mean_params
from trainer.metrics import pose_metrics, summarize
from trainer.model import NUM_JOINTS, POSE_DIM, cam_translation

# ------------------------------------------------------------------ data


def read_dir(directory: str | Path, split: str, columns: list[str]):
    import pyarrow as pa

    from trainer.tables import SAMPLES_SCHEMA, read_table, shard_paths
    return pa.concat_tables([read_table(p, SAMPLES_SCHEMA).select(columns) for p in shard_paths(directory, split=split)])


def load_train(directory: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """Train keypoints and the held-out truth (pose, betas) of a benchmark folder."""
    from trainer.tables import to_numpy
    train = read_dir(directory, "train", ["sample_id", "keypoints"])
    truth = read_dir(directory, "truth", ["sample_id", "pose", "betas"])
    assert train.column("sample_id").to_pylist() == truth.column("sample_id").to_pylist()
    n = len(train) if limit is None else min(limit, len(train))
    return {"ids": train.column("sample_id").to_pylist()[:n], "keypoints": to_numpy(train, "keypoints")[:n].astype(np.float32),
            "pose": to_numpy(truth, "pose")[:n].astype(np.float32), "betas": to_numpy(truth, "betas")[:n].astype(np.float32)}


def load_test(directory: str | Path) -> dict[str, np.ndarray]:
    from trainer.evaluate import LSP_IN_GT24
    from trainer.tables import to_numpy
    test = read_dir(directory, "test", ["sample_id", "keypoints", "joints3d", "pose", "betas"])
    return {"keypoints": to_numpy(test, "keypoints").astype(np.float32),
            "lsp": to_numpy(test, "joints3d")[:, LSP_IN_GT24, :3].astype(np.float64),
            "pose": to_numpy(test, "pose").astype(np.float32), "betas": to_numpy(test, "betas").astype(np.float32)}


# ------------------------------------------------------------------ model


def keypoint_features(keypoints: torch.Tensor) -> torch.Tensor:
    """(B, 49, 3) normalized keypoints + confidence -> (B, 147): x and y where the keypoint
    is present (0 where it is missing) and the confidence itself (the mask)."""
    conf = keypoints[..., 2:3].clamp(min=0.0)
    present = (conf > 0).to(keypoints.dtype)
    xy = torch.nan_to_num(keypoints[..., :2]) * present
    return torch.cat([xy, conf], dim=-1).flatten(1)


class KeypointRegressor(nn.Module):
    """49 keypoints -> MLP encoder -> HMR's IEF head (mean start, n_iter corrections, 6D)."""

    def __init__(self, width: int = 512, depth: int = 2, hidden: int = 1024, n_iter: int = 3, dropout: float = 0.5,
                 mean_params: dict | None = None, encoder_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        inp = 49 * 3
        for _ in range(depth):
            layers += [nn.Linear(inp, width)] + ([nn.LayerNorm(width)] if encoder_norm else []) + [nn.ReLU(inplace=True)]
            inp = width
        self.encoder = nn.Sequential(*layers)
        self.n_iter = n_iter
        state = POSE_DIM + 10 + 3
        self.fc1 = nn.Linear(width + state, hidden)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop2 = nn.Dropout(dropout)
        self.decpose = nn.Linear(hidden, POSE_DIM)
        self.decshape = nn.Linear(hidden, 10)
        self.deccam = nn.Linear(hidden, 3)
        for layer in (self.decpose, self.decshape, self.deccam):
            nn.init.xavier_uniform_(layer.weight, gain=0.01)
        params = load_mean_params() if mean_params is None else mean_params
        self.register_buffer("init_pose", torch.as_tensor(np.asarray(params["pose"]), dtype=torch.float32)[None])
        self.register_buffer("init_shape", torch.as_tensor(np.asarray(params["shape"]), dtype=torch.float32)[None])
        self.register_buffer("init_cam", torch.as_tensor(np.asarray(params["cam"]), dtype=torch.float32)[None])

    def forward(self, keypoints: torch.Tensor):
        batch = keypoints.shape[0]
        features = self.encoder(keypoint_features(keypoints))
        pose = self.init_pose.expand(batch, -1)
        shape = self.init_shape.expand(batch, -1)
        cam = self.init_cam.expand(batch, -1)
        for _ in range(self.n_iter):
            x = torch.cat([features, pose, shape, cam], dim=1)
            x = self.drop1(self.fc1(x))
            x = self.drop2(self.fc2(x))
            pose = self.decpose(x) + pose
            shape = self.decshape(x) + shape
            cam = self.deccam(x) + cam
        rotmat = sixd_to_rotmat(pose.float().reshape(batch, NUM_JOINTS, 6))
        return rotmat, shape.float(), cam.float()


# ------------------------------------------------------------------ augmentation

_MIRROR = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))


@dataclass
class KpAugment:
    flip_prob: float = 0.5
    rot_factor: float = 30.0
    rot_prob: float = 0.4
    scale_factor: float = 0.25
    drop_prob: float = 0.1       # each present keypoint of the input is dropped with this probability
    jitter: float = 0.01         # input keypoint noise, normalized crop units (1 = half the crop)
    on: bool = True


def rot2(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def augment_batch(keypoints: torch.Tensor, rotmat: torch.Tensor, aug: KpAugment, gen: torch.Generator):
    """(B, 49, 3) keypoints, (B, 24, 3, 3) pose targets -> (input keypoints, target keypoints,
    target rotmats), all augmented consistently: rotate and scale, then flip (SPIN's order); the
    input alone also gets keypoint dropout and jitter."""
    b = keypoints.shape[0]
    if not aug.on:
        return keypoints, keypoints, rotmat
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    rot = (n(b) * aug.rot_factor).clamp(-2 * aug.rot_factor, 2 * aug.rot_factor)
    rot = torch.where(u(b) < aug.rot_prob, rot, torch.zeros_like(rot))
    scale = (n(b) * aug.scale_factor + 1).clamp(1 - aug.scale_factor, 1 + aug.scale_factor)
    flip = u(b) < aug.flip_prob
    r2 = rot2(torch.deg2rad(rot))
    xy = torch.einsum("bij,bkj->bki", r2, keypoints[..., :2]) / scale[:, None, None]
    kp = torch.cat([xy, keypoints[..., 2:]], -1)
    rz = torch.zeros(b, 3, 3)
    rz[:, :2, :2] = r2
    rz[:, 2, 2] = 1.0
    rotmat = torch.cat([torch.matmul(rz[:, None], rotmat[:, :1]), rotmat[:, 1:]], 1)
    flipped_kp = kp[:, list(FLIP_PERM)] * torch.tensor([-1.0, 1.0, 1.0])
    kp = torch.where(flip[:, None, None], flipped_kp, kp)
    flipped_rot = _MIRROR @ rotmat[:, list(SMPL_FLIP_PERM)] @ _MIRROR
    rotmat = torch.where(flip[:, None, None, None], flipped_rot, rotmat)
    inp = kp.clone()
    if aug.jitter > 0:
        inp[..., :2] = inp[..., :2] + aug.jitter * n(b, 49, 2)
    if aug.drop_prob > 0:
        drop = u(b, 49) < aug.drop_prob
        inp[..., 2] = torch.where(drop, torch.zeros_like(inp[..., 2]), inp[..., 2])
    return inp, kp, rotmat


# ------------------------------------------------------------------ training


@dataclass
class KpTrainConfig:
    steps: int = 4000
    batch_size: int = 512
    lr: float = 1e-3
    lr_end: float = 0.0          # cosine decay to lr * lr_end (1: constant)
    weight_decay: float = 0.0
    mode: str = "fits"           # fits | 2d
    width: int = 512
    depth: int = 2
    hidden: int = 1024
    dropout: float = 0.5
    n_iter: int = 3
    encoder_norm: bool = False
    seed: int = 0
    grad_clip: float = 0.0
    weights: dict = field(default_factory=dict)
    augment: dict = field(default_factory=dict)
    bf16: bool = False           # the network (not the body or the losses) under bfloat16 autocast


def kinematic_levels(parents: list[int]) -> list[list[int]]:
    """Joints grouped by depth in the kinematic tree (root first)."""
    depth = [0] * len(parents)
    for j in range(1, len(parents)):
        depth[j] = depth[parents[j]] + 1
    return [[j for j in range(len(parents)) if depth[j] == d] for d in range(max(depth) + 1)]


class KpBody(nn.Module):
    """`KeypointBody`'s 49 keypoints for large training batches, without skinning vertices.

    A keypoint made from vertices is a fixed linear combination of them (one vertex, or a row
    of the extra regressor): k_m = sum_s M_ms v_s, and linear blend skinning gives
    v_s = sum_j w_sj (R_j (p_s - J_j) + g_j) with R_j, g_j joint j's global rotation and posed
    position, J_j its rest position and p_s the shaped (and pose-blended) rest vertex. So
        k_m = sum_j R_j Q_mj + c_mj (g_j - R_j J_j),   c_mj = sum_s M_ms w_sj,
        Q_mj = sum_s M_ms w_sj p_s   (linear in the betas and the pose-blend features),
    which costs a few thousand multiply-adds per sample instead of skinning the support vertices.
    The kinematic chain runs one tree level at a time. Same numbers as KeypointBody (`check_kpbody`)."""

    def __init__(self, model=None):
        super().__init__()
        self.kb = kb = KeypointBody(model if model is not None else load_body_model())
        support = kb.v_template.shape[0]
        mix = torch.cat([torch.nn.functional.one_hot(kb.vertex_rows, support).to(kb.extra.dtype), kb.extra])  # (M, S)
        mw = mix[:, :, None] * kb.lbs_weights[None]                                   # (M, S, 24)
        self.num_virtual = mix.shape[0]
        c = mw.sum(1)                                                                  # (M, 24)
        q0 = torch.einsum("msj,sc->mjc", mw, kb.v_template)                           # (M, 24, 3)
        qb = torch.einsum("msj,scl->mjcl", mw, kb.shapedirs)                          # (M, 24, 3, 10)
        posedirs = kb.posedirs.reshape(-1, support, 3)                                # (207, S, 3)
        self.has_pose_blend = bool(posedirs.abs().max() > 0)  # the built-in model has none
        qp = torch.einsum("msj,qsc->mjcq", mw, posedirs) if self.has_pose_blend else None
        # only the (keypoint, joint) pairs whose skinning weight is not zero: few per keypoint
        used = (c != 0) | (q0 != 0).any(-1) | (qb != 0).flatten(2).any(-1)
        if qp is not None:
            used |= (qp != 0).flatten(2).any(-1)
        pair_m, pair_j = torch.nonzero(used, as_tuple=True)
        self.register_buffer("pair_m", pair_m)
        self.register_buffer("pair_j", pair_j)
        self.register_buffer("pair_c", c[pair_m, pair_j][:, None])                    # (P, 1)
        self.register_buffer("pair_q0", q0[pair_m, pair_j])                           # (P, 3)
        self.register_buffer("pair_qb", qb[pair_m, pair_j].permute(2, 0, 1).reshape(qb.shape[-1], -1))  # (10, P*3)
        if qp is not None:
            self.register_buffer("pair_qp", qp[pair_m, pair_j].permute(2, 0, 1).reshape(qp.shape[-1], -1))
        parents = [int(p) for p in kb.parents]
        levels = kinematic_levels(parents)[1:]
        order = [0] + [j for level in levels for j in level]
        position = {j: i for i, j in enumerate(order)}
        self.levels = [torch.tensor(level) for level in levels]
        self.level_parents = [torch.tensor([parents[j] for j in level]) for level in levels]
        self.parent_positions = [torch.tensor([position[parents[j]] for j in level]) for level in levels]
        self.register_buffer("unsort", torch.argsort(torch.tensor(order)))

    def forward(self, rotmat: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        kb = self.kb
        batch = rotmat.shape[0]
        if rotmat.ndim == 2:
            rotmat = pose_to_rotmat(rotmat)
        joints = kb.joint_template + torch.einsum("bl,jcl->bjc", betas, kb.joint_shapedirs)     # (B, 24, 3)
        g_rot, g_loc = rotmat[:, :1], joints[:, :1]
        for level, parent_pos, parents in zip(self.levels, self.parent_positions, self.level_parents):
            pr = g_rot[:, parent_pos]
            offset = joints[:, level] - joints[:, parents]
            g_rot = torch.cat([g_rot, pr @ rotmat[:, level]], 1)
            g_loc = torch.cat([g_loc, g_loc[:, parent_pos] + (pr @ offset[..., None])[..., 0]], 1)
        g_rot, g_loc = g_rot[:, self.unsort], g_loc[:, self.unsort]       # (B, 24, 3, 3), (B, 24, 3)
        trans = g_loc - (g_rot @ joints[..., None])[..., 0]               # (B, 24, 3)
        pairs = len(self.pair_m)
        q = self.pair_q0 + (betas @ self.pair_qb).reshape(batch, pairs, 3)
        if self.has_pose_blend:
            eye = torch.eye(3, dtype=rotmat.dtype)
            q = q + ((rotmat[:, 1:] - eye).reshape(batch, -1) @ self.pair_qp).reshape(batch, pairs, 3)
        rot = g_rot[:, self.pair_j]                                        # (B, P, 3, 3)
        terms = (rot * q[:, :, None, :]).sum(-1) + self.pair_c * trans[:, self.pair_j]
        virtual = terms.new_zeros(batch, self.num_virtual, 3).index_add(1, self.pair_m, terms)
        source = torch.cat([g_loc, virtual], 1)
        return source[:, kb.keypoint_source]


def check_kpbody(body: KpBody, n: int = 64) -> float:
    """Largest difference (m) from KeypointBody on random poses and shapes."""
    g = torch.Generator().manual_seed(0)
    pose = torch.randn(n, 72, generator=g) * 0.5
    betas = torch.randn(n, 10, generator=g)
    with torch.no_grad():
        return float((body(pose_to_rotmat(pose), betas) - body.kb(pose, betas)).abs().max())


def kp_losses(rotmat, betas, cam, target_kp, target_rot, betas_t, pose_valid, betas_valid, body: KpBody,
              w: LossWeights, mode: str, prior=None) -> tuple[torch.Tensor, dict]:
    """SPIN's terms (2D keypoints, pose, betas, camera; no 3D keypoints: the train split has none)."""
    kp3d = body(rotmat, betas)
    pred_2d = project_keypoints(kp3d, cam)
    per_joint = keypoint_loss(pred_2d, target_kp, w.openpose, w.gt_keypoints)
    ones = torch.ones(rotmat.shape[0], dtype=torch.bool)
    terms = {"keypoints": (per_joint.mean(-1), ones), "cam": (camera_loss(cam), ones)}
    if mode == "fits":
        terms["pose"] = (pose_loss(rotmat, target_rot), pose_valid)
        terms["betas"] = (betas_loss(betas, betas_t), betas_valid)
    else:
        body_pose = rotmat_to_pose(rotmat)[:, 3:]
        terms["pose_prior"] = (prior(body_pose), ones)
        terms["angle_prior"] = (angle_prior(body_pose), ones)
        terms["shape_prior"] = (shape_prior(betas), ones)
    factors = {name: w.keypoints for name in ("pose_prior", "angle_prior", "shape_prior")}
    values = {k: masked_mean(v, m) for k, (v, m) in terms.items()}
    total = w.scale * sum(factors.get(k, 1.0) * getattr(w, k) * v for k, v in values.items())
    return total, {k: float(v.detach()) for k, v in values.items()}


def labels_from_fits(pose: np.ndarray, betas: np.ndarray, valid: np.ndarray, betas_ok: np.ndarray):
    """SPIN's supervision masks with the shape guard (see trainer.dataset._fit_targets)."""
    return {"pose": pose, "betas": np.where(betas_ok[:, None], betas, 0.0).astype(np.float32),
            "pose_valid": valid & betas_ok, "betas_valid": valid | ~betas_ok}


def train(config: KpTrainConfig, keypoints: np.ndarray, labels: dict | None, body: KpBody,
          init_state: dict | None = None, log_every: int = 0, prior=None) -> tuple[KeypointRegressor, dict]:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed + 17)
    model = KeypointRegressor(config.width, config.depth, config.hidden, config.n_iter, config.dropout,
                              encoder_norm=config.encoder_norm)
    if init_state is not None:
        model.load_state_dict(init_state)
    weights = LossWeights.from_dict(config.weights)
    aug = KpAugment(**config.augment)
    kp_all = torch.as_tensor(keypoints)
    n = len(kp_all)
    if config.mode == "fits":
        rot_all = pose_to_rotmat(torch.as_tensor(labels["pose"]))
        betas_all = torch.as_tensor(labels["betas"])
        pv_all, bv_all = torch.as_tensor(labels["pose_valid"]), torch.as_tensor(labels["betas_valid"])
    else:
        rot_all = torch.eye(3).expand(n, 24, 3, 3)
        betas_all = torch.zeros(n, 10)
        pv_all = bv_all = torch.zeros(n, dtype=torch.bool)
        prior = prior if prior is not None else load_prior()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: config.lr_end + (1 - config.lr_end) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    log = []
    perm, pos = torch.randperm(n, generator=gen), 0
    norms: list[float] = []
    for step in range(config.steps):
        if pos + config.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + config.batch_size]
        pos += config.batch_size
        inp, tkp, trot = augment_batch(kp_all[idx], rot_all[idx], aug, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            rotmat, betas, cam = model(inp)
        rotmat, betas, cam = rotmat.float(), betas.float(), cam.float()
        loss, values = kp_losses(rotmat, betas, cam, tkp, trot, betas_all[idx], pv_all[idx], bv_all[idx], body,
                                 weights, config.mode, prior)
        if not torch.isfinite(loss):
            raise RuntimeError(f"diverged at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf")))
        norms.append(norm)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == config.steps - 1):
            log.append({"step": step, "loss": float(loss.detach()), "grad_norm": norm, **values})
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    return model, {"seconds": round(seconds, 1), "samples_per_s": round(config.steps * config.batch_size / seconds),
                   "grad_norm": {"median": float(np.median(norms)), "p99": float(np.percentile(norms, 99)), "max": float(np.max(norms)),
                                 "argmax": int(np.argmax(norms))},
                   "samples_per_cpu_s": round(config.steps * config.batch_size / cpu), "threads": torch.get_num_threads(),
                   "log": log}


# ------------------------------------------------------------------ prediction, evaluation, fitting


@torch.no_grad()
def predict(model: KeypointRegressor, keypoints: np.ndarray, batch: int = 4096) -> dict[str, np.ndarray]:
    model.eval()
    out = {"rotmat": [], "betas": [], "cam": []}
    for s in range(0, len(keypoints), batch):
        r, b, c = model(torch.as_tensor(keypoints[s:s + batch]))
        out["rotmat"].append(r), out["betas"].append(b), out["cam"].append(c)
    rotmat, betas, cam = (torch.cat(v) for v in out.values())
    return {"rotmat": rotmat, "pose": rotmat_to_pose(rotmat).numpy(), "betas": betas.numpy(),
            "cam": cam.numpy(), "cam_t": cam_translation(cam).numpy()}


@torch.no_grad()
def lsp_joints(body: KpBody, pose_or_rotmat, betas, batch: int = 4096) -> np.ndarray:
    pose_or_rotmat = torch.as_tensor(pose_or_rotmat)
    betas = torch.as_tensor(betas)
    parts = [body(pose_or_rotmat[s:s + batch], betas[s:s + batch])[:, list(LSP14)] for s in range(0, len(betas), batch)]
    return torch.cat(parts).double().numpy()


def pa_mpjpe_of(body: KpBody, pose_or_rotmat, betas, gt_lsp: np.ndarray) -> dict[str, float]:
    pred = lsp_joints(body, pose_or_rotmat, betas)
    return {k: round(v, 2) for k, v in summarize(pose_metrics(torch.as_tensor(pred), torch.as_tensor(gt_lsp))).items()
            if k in ("mpjpe", "pa_mpjpe")}


def evaluate(model: KeypointRegressor, test: dict, body: KpBody) -> dict[str, float]:
    pred = predict(model, test["keypoints"])
    return pa_mpjpe_of(body, pred["rotmat"], pred["betas"], test["lsp"])


def truth_lsp(body: KpBody, data: dict) -> np.ndarray:
    return lsp_joints(body, data["pose"], data["betas"])


def run_fits(keypoints: np.ndarray, init: dict | None, batch: int = 512, smplify: dict | None = None,
             model=None, prior=None) -> dict[str, np.ndarray]:
    """SMPLify on every sample (init None: the mean pose, camera from the keypoints)."""
    from fitting.smplify import FitInit, SmplifyConfig, fit, mean_init
    from trainer.mean_params import mean_pose_axis_angle
    model = model or load_body_model()
    prior = prior or load_prior()
    config = SmplifyConfig.from_dict(smplify or {})
    mean = load_mean_params()
    out = {k: [] for k in ("pose", "betas", "cam_t", "loss", "valid", "betas_ok")}
    for s in range(0, len(keypoints), batch):
        kp = normalized_to_pixels(torch.as_tensor(keypoints[s:s + batch]), IMG_RES)
        if init is None:
            fi = mean_init(model, torch.nan_to_num(kp), torch.as_tensor(mean_pose_axis_angle(mean)), torch.as_tensor(mean["shape"]))
        else:
            fi = FitInit(*(torch.as_tensor(init[k][s:s + batch], dtype=torch.float32) for k in ("pose", "betas", "cam_t")))
        r = fit(model, prior, kp, fi, config)
        for k in out:
            out[k].append(getattr(r, k).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def merge_best(old: dict, new: dict) -> dict:
    """SPIN's fits dictionary: the new fit where its loss is strictly lower (same keypoints)."""
    take = np.isfinite(new["loss"]) & (~np.isfinite(old["loss"]) | (new["loss"] < old["loss"]))
    merged = {k: np.where(take.reshape(-1, *[1] * (old[k].ndim - 1)), new[k], old[k]) for k in old}
    merged["_replaced"] = float(take.mean())
    return merged


def config_dict(config) -> dict:
    return asdict(config)
