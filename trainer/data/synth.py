"""The synthetic benchmark: people rendered from the body model, with SPIN's camera convention.

A sample is a pure function of (seed, split, index): its own numpy Generator draws the scene
(pose, shape, view, camera, crop) and then its appearance, so the data do not depend on the
number of workers. Cameras: a source camera of focal F_SOURCE px looks down +z with y down in the
image; the person stands at a random depth and off-axis angle; the stored crop is SPIN's square
box (side 200 * scale, the person's box times a ~1.2 margin) rendered directly at `img_size`.
Global orientation is in that camera frame: an upright person facing the camera is a rotation by
pi about x. GT joints3d are the 24 ground-truth keypoints in metres in the camera frame,
translation included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
import roma
import torch

from fitting.body_model import BodyModel, load_body_model
from fitting.camera import pinhole
from fitting.errors import BadInput
from fitting.keypoints import GT24, KEYPOINT_SOURCE, NUM_KEYPOINTS, SMPL_PARENTS
from fitting.pose_sampler import sample_body_poses
from fitting.render import part_labels, render
from fitting.settings import Settings
from trainer.data.samples import box_to_center_scale, encode_image, encode_mask, to_normalized
from trainer.data.synth_scene import (
    annotate_keypoints,
    camera_effects,
    clothing_colors,
    draw_occluders,
    random_background,
    random_light,
)

SEED_OFFSET = 1_000_003  # the pose prior is fitted on seeds 0..; the benchmark draws elsewhere
SPLIT_CODES = {"train": 0, "test": 1}
F_SOURCE = 1000.0
PP_SOURCE = np.array([500.0, 500.0])
# Joints whose skin makes the upper body, for crops that cut the legs off (truncation).
UPPER_BODY = (0, 3, 6, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)
LIMB_JOINTS = (4, 5, 7, 8, 18, 19, 20, 21)
TORSO = (0, 3, 6, 9, 12, 13, 14)
# Depth a joint may sit behind its own limb's surface and still count as visible (metres).
SURFACE_TOL, FLESH_DEPTH = 0.03, 0.3
SUPERSAMPLE = 2

SYNTH_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_train": 160, "num_test": 64, "img_size": 96, "shard_size": 64},
    "small": {"num_train": 2000, "num_test": 400, "img_size": 128, "shard_size": 500},
    "full": {"num_train": 50000, "num_test": 5000, "img_size": 224, "shard_size": 2000},
}


@dataclass
class SynthConfig(Settings):
    """What `data synth` makes; the presets fill the sizes."""
    SECTION = "synth"

    preset: str = "tiny"
    num_train: int = 160
    num_test: int = 64
    img_size: int = 96
    shard_size: int = 64
    seed: int = 0
    variety: float = 1.0            # pose sampler spread
    occluder_prob: float = 0.45     # share of images with 1-2 occluders
    truncation_prob: float = 0.1    # share of crops that cut the legs off
    back_view_prob: float = 0.15
    focal_ratio: tuple[float, float] = (2.5, 12.0)   # focal / crop side: perspective strength
    supersample: int = SUPERSAMPLE  # render at this multiple of img_size, then average down
    body_model: str | None = None   # None: the built-in model

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "SynthConfig":
        if preset not in SYNTH_PRESETS:
            raise BadInput(f"unknown preset '{preset}', expected one of {sorted(SYNTH_PRESETS)}")
        values = {**SYNTH_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict({"preset": preset, **values})

    def __post_init__(self) -> None:
        if self.num_train < 0 or self.num_test < 0 or self.shard_size < 1 or self.img_size < 32:
            raise BadInput("counts must be >= 0, shard size >= 1 and image size >= 32")
        if self.supersample < 1:
            raise BadInput("supersample must be >= 1")


@dataclass
class Scene:
    """Everything geometric about one sample. yaw/pitch/roll in radians; off_axis: angles of the
    person's centre from the optical axis; margin: crop box / person box; shift: crop centre
    offset as a fraction of the box side."""
    body_pose: np.ndarray            # (69,)
    betas: np.ndarray                # (10,)
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    focal_ratio: float = 5.0
    off_axis: np.ndarray = field(default_factory=lambda: np.zeros(2))
    margin: float = 1.2
    shift: np.ndarray = field(default_factory=lambda: np.zeros(2))
    truncated: bool = False


def global_orientation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3, 3) body-to-camera rotation: yaw about the body's vertical axis, then the flip by pi
    about x (SMPL's y-up body into the y-down camera), then the camera's pitch and roll."""
    turns = torch.tensor([[0.0, 0.0, roll], [pitch, 0.0, 0.0], [np.pi, 0.0, 0.0], [0.0, yaw, 0.0]], dtype=torch.float64)
    roll_r, pitch_r, flip, yaw_r = roma.rotvec_to_rotmat(turns)
    return (roll_r @ pitch_r @ flip @ yaw_r).numpy()


def sample_scene(rng: np.random.Generator, cfg: SynthConfig) -> Scene:
    """Draw a scene: pose from the sampler, shape N(0,1) clipped (some heavier or thinner), a
    view mostly facing the camera (yaw within +-90 deg, some back views), slight pitch and roll."""
    body_pose = sample_body_poses(1, rng, variety=cfg.variety)[0].astype(np.float64)
    betas = np.clip(rng.normal(0, 1, 10), -2.5, 2.5)
    if rng.uniform() < 0.2:
        betas[:2] = rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 2.8, 2)
    back = rng.uniform() < cfg.back_view_prob
    yaw = rng.uniform(-np.pi / 2, np.pi / 2) + (np.pi if back else 0.0)
    roll = np.clip(rng.normal(0, np.radians(8)), -np.radians(30), np.radians(30))
    low, high = np.log(cfg.focal_ratio[0]), np.log(cfg.focal_ratio[1])
    return Scene(
        body_pose=body_pose, betas=betas, yaw=float(yaw), pitch=float(rng.uniform(-0.25, 0.2)),
        roll=float(roll), focal_ratio=float(np.exp(rng.uniform(low, high))),
        off_axis=rng.uniform([-0.2, -0.1], [0.2, 0.1]), margin=float(rng.uniform(1.1, 1.35)),
        shift=rng.normal(0, 0.03, 2), truncated=bool(rng.uniform() < cfg.truncation_prob),
    )


def scene_pose(scene: Scene) -> np.ndarray:
    """(72,) SMPL pose of the scene: camera-frame global orientation + body pose."""
    orient = roma.rotmat_to_rotvec(torch.from_numpy(global_orientation(scene.yaw, scene.pitch, scene.roll))).numpy()
    return np.concatenate([orient, scene.body_pose])


@dataclass
class SynthContext:
    """Per-process constants: the model and per-vertex / per-keypoint tables."""
    model: BodyModel
    faces: np.ndarray
    dominant: np.ndarray         # (V,) strongest skinning joint of each vertex
    parts: np.ndarray            # (V,) 1..6 part label (the evaluation's segmentation)
    own: np.ndarray              # (49, 24) bool: joints whose surface may cover the keypoint
    rest_vertices: np.ndarray
    rest_joints: np.ndarray


def keypoint_owners(model: BodyModel) -> np.ndarray:
    """(49, 24) bool: for each keypoint, its nearest SMPL joint in the rest pose, that joint's
    parent and its children (all of the trunk for a trunk joint): the surface in front of a
    keypoint belongs to one of them when the keypoint is seen through its own flesh."""
    with torch.no_grad():
        out = model(torch.zeros(1, 72), torch.zeros(1, 10))
    joints, kps = out.joints[0].numpy(), out.keypoints[0].numpy()
    own = np.zeros((NUM_KEYPOINTS, 24), bool)
    for k, source in enumerate(KEYPOINT_SOURCE):
        j = source if source < 24 else int(np.argmin(np.linalg.norm(joints - kps[k], axis=1)))
        own[k, j] = True
        if SMPL_PARENTS[j] >= 0:
            own[k, SMPL_PARENTS[j]] = True
        own[k, [c for c, p in enumerate(SMPL_PARENTS) if p == j]] = True
        if j in TORSO:  # the trunk is one block: a thorax point is seen through any of its skin
            own[k, list(TORSO)] = True
    return own


@lru_cache(maxsize=2)
def synth_context(body_model: str | None) -> SynthContext:
    """The context for a body model path (None: built-in), built once per process."""
    model = load_body_model(body_model)
    model.eval()
    smpl = model.smpl
    rest = smpl.v_template.numpy().astype(np.float64)
    return SynthContext(
        model=model, faces=model.faces, dominant=smpl.lbs_weights.numpy().argmax(axis=1),
        parts=np.asarray(part_labels(model)), own=keypoint_owners(model),
        rest_vertices=rest, rest_joints=(smpl.J_regressor.numpy() @ rest),
    )


def place_and_crop(vertices: np.ndarray, dominant: np.ndarray, scene: Scene, size: int):
    """Translation of the posed body and SPIN's crop of it.

    Returns (cam_t (3,), center (2,), scale, focal of the crop, principal point in the crop (2,))."""
    lo, hi = vertices.min(0), vertices.max(0)
    mid = (lo + hi) / 2
    extent = float(max(hi[0] - lo[0], hi[1] - lo[1]))
    depth = scene.focal_ratio * scene.margin * extent
    cam_t = np.array([depth * np.tan(scene.off_axis[0]), depth * np.tan(scene.off_axis[1]), depth]) - mid
    uv = pinhole(vertices + cam_t, F_SOURCE, PP_SOURCE)
    if scene.truncated:
        uv = uv[np.isin(dominant, UPPER_BODY)]
    center, scale = box_to_center_scale(np.concatenate([uv.min(0), uv.max(0)]), scene.margin)
    center = center + scene.shift * 200 * scale
    zoom = size / (200.0 * scale)
    return cam_t, center, scale, F_SOURCE * zoom, (PP_SOURCE - (center - 100 * scale)) * zoom


def keypoint_visibility(
    kp_cam: np.ndarray, kp_px: np.ndarray, depth: np.ndarray, joint_map: np.ndarray,
    own: np.ndarray, occluder: np.ndarray | None = None,
) -> np.ndarray:
    """(K,) bool: in frame, not behind another body part (depth buffer) and not under an occluder.

    kp_cam (K, 3) camera-frame keypoints; kp_px (K, 2) crop pixels; depth (H, W) rendered depth
    (inf = empty); joint_map (H, W) dominant joint of the visible surface; own (K, 24) joints
    whose surface a keypoint may be seen through (see `keypoint_owners`)."""
    h, w = depth.shape
    finite = np.all(np.isfinite(kp_px), axis=1)
    inside = finite & (kp_px[:, 0] >= 0) & (kp_px[:, 0] < w) & (kp_px[:, 1] >= 0) & (kp_px[:, 1] < h)
    cols = np.clip(np.nan_to_num(kp_px[:, 0]), 0, w - 1).astype(int)
    rows = np.clip(np.nan_to_num(kp_px[:, 1]), 0, h - 1).astype(int)
    surface = depth[rows, cols]
    z = kp_cam[:, 2]
    in_front = ~np.isfinite(surface) | (z <= surface + SURFACE_TOL)
    own_flesh = own[np.arange(len(own)), joint_map[rows, cols]] & (z - surface <= FLESH_DEPTH)
    visible = inside & (in_front | own_flesh)
    if occluder is not None:
        visible &= ~occluder[rows, cols]
    return visible


@dataclass
class BodyRender:
    """A rendered body: image, mask and 6-part labels at the crop size; depth and the dominant
    joint of the visible surface at `zoom` times the crop size (for keypoint visibility)."""
    image: np.ndarray    # (S, S, 3) uint8
    mask: np.ndarray     # (S, S) bool
    parts: np.ndarray    # (S, S) uint8, 0 background, 1..6
    depth: np.ndarray    # (zS, zS) float32, inf where empty
    joints: np.ndarray   # (zS, zS) int64 dominant SMPL joint of the surface
    zoom: int


def render_body(ctx: SynthContext, vertices: np.ndarray, focal: float, center: np.ndarray, size: int,
                colors: np.ndarray | None = None, background: np.ndarray | None = None,
                light: np.ndarray | None = None, zoom: int = SUPERSAMPLE) -> BodyRender:
    """Render camera-frame vertices (V, 3) at `zoom` x the crop size and average down, which
    anti-aliases the silhouette. The labels carry the part and the joint: part * 32 + joint."""
    labels = (ctx.parts.astype(np.int64) * 32 + ctx.dominant).astype(np.uint8)
    colors = np.full((len(labels), 3), 0.7) if colors is None else colors
    big = size * zoom
    if background is not None:
        background = cv2.resize(background, (big, big), interpolation=cv2.INTER_LINEAR)
    # pixel [j, j + 1) at the crop size is [zoom j, zoom (j + 1)) at the large size
    out = render(vertices.astype(np.float32), ctx.faces, focal * zoom, np.asarray(center) * zoom, big,
                 vertex_colors=colors, part_labels=labels, background=background, light_dir=light)
    if zoom == 1:
        return BodyRender(out.image, out.mask, out.parts // 32, out.depth, out.parts % 32, 1)
    image = cv2.resize(out.image, (size, size), interpolation=cv2.INTER_AREA)
    cover = cv2.resize(out.mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    mask = cover >= 0.5
    parts = np.where(mask, out.parts[zoom // 2::zoom, zoom // 2::zoom] // 32, 0).astype(np.uint8)
    return BodyRender(image, mask, parts, out.depth, (out.parts % 32).astype(np.int64), zoom)


def render_sample(ctx: SynthContext, scene: Scene, vertices: np.ndarray, keypoints: np.ndarray,
                  rng: np.random.Generator, size: int, occluder_prob: float,
                  supersample: int = SUPERSAMPLE) -> dict:
    """Render one posed body (vertices (V, 3), keypoints (49, 3), no translation) into a crop.

    Returns the crop image, masks, keypoints (49, 3) normalized with confidence, the clean
    projections, center/scale, cam_t, visibility and the GT joints3d (24, 4)."""
    cam_t, center, scale, focal, pp = place_and_crop(vertices, ctx.dominant, scene, size)
    verts, kp_cam = vertices + cam_t, keypoints + cam_t
    colors = clothing_colors(rng, ctx.dominant, ctx.rest_vertices, ctx.rest_joints)
    body = render_body(ctx, verts, focal, pp, size, colors, random_background(rng, size), random_light(rng),
                       zoom=supersample)
    kp_px = pinhole(kp_cam, focal, pp)
    image, occluder = body.image, np.zeros((size, size), bool)
    if rng.uniform() < occluder_prob:
        targets = kp_px[[i for i, s in enumerate(KEYPOINT_SOURCE) if s in LIMB_JOINTS]]
        image, occluder = draw_occluders(rng, image, targets, body.mask, int(rng.integers(1, 3)))
    zoomed = np.kron(occluder, np.ones((body.zoom, body.zoom), bool))
    visible = keypoint_visibility(kp_cam, kp_px * body.zoom, body.depth, body.joints, ctx.own, zoomed)
    image = camera_effects(rng, image)
    keypoints2d = annotate_keypoints(rng, kp_px, visible, size)
    in_frame = np.all((kp_px >= 0) & (kp_px < size), axis=1)
    return {
        "image": encode_image(image, quality=int(rng.integers(80, 96))),
        "mask": encode_mask(body.mask), "part_mask": encode_mask(body.parts),
        "keypoints": to_normalized(keypoints2d, size),
        "clean": to_normalized(np.concatenate([kp_px, in_frame[:, None]], 1), size),
        "center": center, "scale": scale, "cam_t": cam_t, "visible": visible,
        "joints3d": np.concatenate([kp_cam[list(GT24)], np.ones((24, 1))], 1),
    }


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed + SEED_OFFSET, SPLIT_CODES[split], index])


def render_chunk(cfg: SynthConfig, split: str, start: int, stop: int) -> list[dict]:
    """Samples start..stop-1 of a split: scenes drawn per sample, one batched body-model pass,
    then per-sample rendering. Returns one record per sample (see `render_sample`) plus its
    sample_id, pose and betas."""
    ctx = synth_context(cfg.body_model)
    rngs = [sample_rng(cfg.seed, split, i) for i in range(start, stop)]
    scenes = [sample_scene(rng, cfg) for rng in rngs]
    pose = torch.as_tensor(np.stack([scene_pose(s) for s in scenes]), dtype=torch.float32)
    betas = torch.as_tensor(np.stack([s.betas for s in scenes]), dtype=torch.float32)
    with torch.no_grad():
        out = ctx.model(pose, betas)
    records = []
    for k, index in enumerate(range(start, stop)):
        record = render_sample(ctx, scenes[k], out.vertices[k].double().numpy(), out.keypoints[k].double().numpy(),
                               rngs[k], cfg.img_size, cfg.occluder_prob, cfg.supersample)
        record.update(sample_id=f"synth-{split}-{index:06d}", pose=pose[k].numpy(), betas=betas[k].numpy())
        records.append(record)
    return records
