"""Files in SPIN's exact formats, written by the tests themselves: no licensed data.

- An SMPL model in the official .pkl layout (chumpy arrays, a scipy sparse J_regressor; neutral,
  male and female, as SPIN's `data/smpl/SMPL_{NEUTRAL,MALE,FEMALE}.pkl`). Its arrays are the
  built-in model's, with the vertices re-ordered so that smplx's default SMPL vertex ids (nose
  332, ...) pick the built-in model's own keypoint vertices; the male and female templates are the
  neutral one moved along two shape directions.
- `J_regressor_extra.npy` (9, 6890) and `J_regressor_h36m.npy` (17, 6890), float64: the built-in
  model's, re-ordered like its vertices (the H36M rows as `body-model build` makes them).
- `h36m_valid_protocol{1,2}.npz`, `mpi_inf_3dhp_test.npz` (SPIN's config reads it as
  `mpi_inf_3dhp_valid.npz`), `3dpw_test.npz` and `lsp_dataset_test.npz` with the keys, shapes and
  dtypes that SPIN's `datasets/preprocess/{h36m,mpi_inf_3dhp,pw3d,lsp_dataset}.py` write
  (`np.savez` of Python lists: unicode strings, float64 numbers), and their images; for LSP also
  the UP-3D mask and part PNGs.

Every sample is a known SMPL pose and shape seen through a known camera, so the truth in each file
is consistent with it: `S` is the mesh through the fixture's J_regressor_h36m, centred on its
pelvis and placed into the 24 rows exactly as h36m.py / mpi_inf_3dhp.py place it (rows 0-12, 14,
16, 17, 18 filled; 13, 15, 19-23 zero); 2D joints are projections; each box follows the script's
rule (the 2D joints' extent times 1.2, or the body's times 0.9 for H36M); the LSP masks are what a
prediction equal to the truth renders in SPIN's 224-px crop, un-cropped to the image the way
SPIN's `uncrop` does it.
"""
from __future__ import annotations

import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.sparse
import torch

from fitting.body_build import h36m_regressor
from fitting.body_model import BodyModel, builtin_body_model_path
from fitting.keypoints import VERTEX_JOINT_NAMES
from fitting.pose_sampler import sample_body_poses
from fitting.render import part_labels, render

SMPL_VERTICES = 6890
FOCAL = 5000.0     # SPIN's crop camera: 5000 px for a 224-px crop
CROP = 224
# h36m.py's and mpi_inf_3dhp.py's placement of the 17 joints into S's 24 rows (`global_idx`,
# `joints_idx`); both H36M17-ordered sources land the same way
S_ROWS = (14, 3, 4, 5, 2, 1, 0, 16, 12, 17, 18, 9, 10, 11, 8, 7, 6)
H36M_CAMERAS = ("54138969", "55011271", "58860488", "60457274")   # protocol 2 keeps the last
GENDER_SHAPE = {"neutral": (0.0, 0.0), "male": (1.2, -0.6), "female": (-1.2, 0.6)}
# OpenPose's 18 COCO joints (3DPW's poses2d): BODY_25 without MidHip and the feet
COCO18 = tuple(i for i in range(19) if i != 8)
LSP14 = tuple(range(25, 39))


# ------------------------------------------------------------------------------------- models

def _builtin() -> dict[str, np.ndarray]:
    with np.load(builtin_body_model_path(), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def smpl_vertex_order(keypoint_ids: np.ndarray, num_vertices: int = SMPL_VERTICES) -> np.ndarray:
    """(V,) old vertex of each new vertex: a permutation that moves the vertex of every smplx vertex
    joint (VERTEX_JOINT_NAMES order, `keypoint_ids`) to smplx's default SMPL id for that joint."""
    import smplx

    order = list(range(num_vertices))
    where = {v: i for i, v in enumerate(order)}
    for name, source in zip(VERTEX_JOINT_NAMES, keypoint_ids):
        target = int(smplx.vertex_ids.vertex_ids["smplh"][name])
        here = where[int(source)]
        order[target], order[here] = order[here], order[target]
        where[order[target]], where[order[here]] = target, here
    return np.asarray(order, dtype=np.int64)


def smpl_arrays(gender: str = "neutral") -> dict[str, np.ndarray]:
    """An SMPL model's arrays as the official .pkl holds them (float64, 6890 vertices, no keypoint
    keys: smplx's default vertex ids apply), from the built-in model."""
    base = _builtin()
    order = smpl_vertex_order(base["vertex_joint_ids"])
    inverse = np.argsort(order)
    shapedirs = base["shapedirs"][order].astype(np.float64)
    template = base["v_template"][order].astype(np.float64) + shapedirs[:, :, :2] @ np.array(GENDER_SHAPE[gender])
    return {
        "v_template": template,
        "shapedirs": shapedirs,
        "posedirs": base["posedirs"][order].astype(np.float64),
        "J_regressor": base["J_regressor"][:, order].astype(np.float64),
        "weights": base["weights"][order].astype(np.float64),
        "kintree_table": base["kintree_table"].astype(np.int64),
        "f": inverse[base["f"]].astype(np.uint32),
    }


def extra_regressor() -> np.ndarray:
    """(9, 6890) float64: SPIN's J_regressor_extra rows (fitting.keypoints.EXTRA_JOINT_NAMES) for
    the fixture model: the built-in model's, re-ordered like its vertices."""
    base = _builtin()
    return base["J_regressor_extra"][:, smpl_vertex_order(base["vertex_joint_ids"])].astype(np.float64)


def write_official_pickle(path: Path, arrays: dict[str, np.ndarray], protocol: int = 2, num_betas: int = 10) -> Path:
    """Write SMPL arrays the way an official SMPL .pkl holds them: chumpy objects for the dense
    arrays (shapedirs with `num_betas` components: 10 in SMPL 1.0, 300 in 1.1), a scipy sparse
    J_regressor, the blend-skinning tags.
    chumpy itself is not needed: a stand-in class whose module is `chumpy.ch` is registered only
    while dumping."""
    module = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    module.Ch = Ch
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = types.ModuleType("chumpy"), module
    try:
        extra = int(np.ceil(num_betas / arrays["shapedirs"].shape[2])) - 1
        shapedirs = np.concatenate([arrays["shapedirs"]] + [0.1 * arrays["shapedirs"]] * extra, axis=2)[:, :, :num_betas]
        raw = {
            "v_template": Ch(np.asarray(arrays["v_template"], np.float64)),
            "shapedirs": Ch(shapedirs.astype(np.float64)),
            "posedirs": np.asarray(arrays["posedirs"], np.float64),
            "J_regressor": scipy.sparse.csc_matrix(np.asarray(arrays["J_regressor"], np.float64)),
            "weights": Ch(np.asarray(arrays["weights"], np.float64)),
            "kintree_table": np.asarray(arrays["kintree_table"], np.int64),
            "f": np.asarray(arrays["f"], np.uint32),
            "J": np.zeros((24, 3)),
            "bs_style": "lbs", "bs_type": "lrotmin",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            pickle.dump(raw, fh, protocol=protocol)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return path


@dataclass
class SpinData:
    """SPIN's `data/` folder as the fixture writes it, and the models that made it."""
    root: Path
    smpl_dir: Path                 # SMPL_{NEUTRAL,MALE,FEMALE}.pkl
    extra: Path                    # J_regressor_extra.npy
    h36m: Path                     # J_regressor_h36m.npy
    arrays: dict[str, dict]        # gender -> SMPL arrays (float64)
    extra_array: np.ndarray        # (9, 6890)
    h36m_array: np.ndarray         # (17, 6890)

    def model(self, gender: str = "neutral") -> BodyModel:
        """The gendered model as this project loads it (with the extra regressor)."""
        return BodyModel({**self.arrays[gender], "J_regressor_extra": self.extra_array.astype(np.float32),
                          "J_regressor_h36m": self.h36m_array.astype(np.float32)}, name=f"fixture SMPL ({gender})")


def write_spin_data(root: Path) -> SpinData:
    """ROOT/smpl/SMPL_{NEUTRAL,MALE,FEMALE}.pkl, ROOT/J_regressor_extra.npy, ROOT/J_regressor_h36m.npy."""
    root = Path(root)
    arrays = {g: smpl_arrays(g) for g in GENDER_SHAPE}
    for gender, values in arrays.items():
        write_official_pickle(root / "smpl" / f"SMPL_{gender.upper()}.pkl", values)
    extra = extra_regressor()
    h36m = h36m_regressor(arrays["neutral"]["J_regressor"], extra)
    np.save(root / "J_regressor_extra.npy", extra)
    np.save(root / "J_regressor_h36m.npy", h36m)
    return SpinData(root, root / "smpl", root / "J_regressor_extra.npy", root / "J_regressor_h36m.npy",
                    arrays, extra, h36m)


# ------------------------------------------------------------------------------------- scenes

@dataclass
class Scenes:
    """N people, each a known SMPL pose and shape seen by a known camera.

    cam is SPIN's weak-perspective camera (s, tx, ty) of the 224-px crop of the box (center,
    scale); the image camera is the same perspective camera in image pixels (focal
    5000 * 200 * scale / 224, principal point at the box centre), so the crop frames the person
    as the truth says. SPIN's pixel coordinates put a pixel's centre at its integer index."""
    pose: np.ndarray          # (N, 72) axis-angle, global orientation in the camera frame
    betas: np.ndarray         # (N, 10)
    gender: np.ndarray        # (N,) 'm' / 'f' (3DPW), else all 'n'
    cam: np.ndarray           # (N, 3)
    cam_t: np.ndarray         # (N, 3) camera translation of the crop camera
    center: np.ndarray        # (N, 2) float64
    scale: np.ndarray         # (N,) float64
    image_hw: np.ndarray      # (N, 2) int
    vertices: np.ndarray      # (N, V, 3) the true mesh, camera frame (translated)
    keypoints: np.ndarray     # (N, 49, 3) camera frame
    h36m: np.ndarray          # (N, 17, 3) the mesh through J_regressor_h36m, camera frame

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N, K, 3) camera-frame points -> (N, K, 2) image pixels in SPIN's convention."""
        side = 200.0 * self.scale[:, None, None]
        crop = FOCAL * points[..., :2] / points[..., 2:3] + CROP / 2.0
        return self.center[:, None, :] + (crop - CROP / 2.0) * side / CROP


def sample_poses(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 72) upright people facing the camera within +-50 degrees of yaw, plausible body poses."""
    pose = np.zeros((n, 72))
    yaw = rng.uniform(-0.9, 0.9, n)
    for k in range(n):
        # pi about x turns SMPL's y-up body upright in the camera's y-down frame
        R = cv2.Rodrigues(np.array([np.pi, 0.0, 0.0]))[0] @ cv2.Rodrigues(np.array([0.0, yaw[k], 0.0]))[0]
        pose[k, :3] = cv2.Rodrigues(R)[0][:, 0]
    pose[:, 3:] = sample_body_poses(n, rng)
    return pose


def frame_camera(points: np.ndarray, margin: float, iterations: int = 60) -> np.ndarray:
    """(K, 3) body points (no translation) -> SPIN's (s, tx, ty) that centres their projection in the
    224-px crop with an extent of 224 / margin: the crop a box rule of `margin` draws around them."""
    s, t = 1.0, np.zeros(2)
    for _ in range(iterations):
        tz = 2.0 * FOCAL / (CROP * s)
        q = FOCAL * (points[:, :2] + t) / (points[:, 2:3] + tz) + CROP / 2.0
        lo, hi = q.min(0), q.max(0)
        s *= (CROP / margin) / (hi - lo).max()
        t -= ((lo + hi) / 2.0 - CROP / 2.0) * tz / FOCAL
    return np.array([s, t[0], t[1]])


def make_scenes(data: SpinData, n: int, seed: int, frame_on: str, margin: float, gendered: bool = False,
                inside: bool = False) -> Scenes:
    """N scenes; `frame_on` names the points that the dataset's box rule uses: 'lsp14', 'h36m',
    'coco18' or 'vertices'. With `inside`, every box lies inside its image (3DHP keeps only such
    frames)."""
    rng = np.random.default_rng(seed)
    pose = sample_poses(n, rng)
    betas = np.clip(rng.normal(size=(n, 10)), -2.0, 2.0)
    gender = np.array(["m", "f"])[np.arange(n) % 2] if gendered else np.full(n, "n")
    models = {g: data.model(g) for g in GENDER_SHAPE}
    verts, kps, h36m = [], [], []
    for k in range(n):
        name = {"m": "male", "f": "female"}.get(str(gender[k]), "neutral")
        with torch.no_grad():
            out = models[name](torch.as_tensor(pose[k:k + 1], dtype=torch.float32),
                               torch.as_tensor(betas[k:k + 1], dtype=torch.float32))
        v = out.vertices[0].double()
        verts.append(v.numpy())
        kps.append(out.keypoints[0].double().numpy())
        h36m.append(models[name].h36m_joints(v[None])[0].numpy())
    verts, kps, h36m = np.stack(verts), np.stack(kps), np.stack(h36m)
    frame_points = {"lsp14": kps[:, list(LSP14)], "h36m": h36m, "coco18": kps[:, list(COCO18)], "vertices": verts}[frame_on]
    cam = np.stack([frame_camera(p, margin) for p in frame_points])
    cam_t = np.stack([cam[:, 1], cam[:, 2], 2.0 * FOCAL / (CROP * cam[:, 0])], axis=1)
    hw = np.stack([rng.integers(180, 260, n), rng.integers(150, 240, n)], axis=1)
    side = rng.uniform(0.75, 1.05, n) * hw.max(1)
    if inside:
        side = np.minimum(side, hw.min(1) - 4.0)
        lo, hi = side / 2.0 + 1.0, hw[:, ::-1] - side[:, None] / 2.0 - 2.0
        center = lo[:, None] + rng.uniform(0, 1, (n, 2)) * (hi - lo[:, None])
    else:  # some boxes reach past the image's edges
        center = hw[:, ::-1] * rng.uniform(0.35, 0.65, (n, 2))
    return Scenes(pose, betas, gender, cam, cam_t, center, side / 200.0, hw,
                  verts + cam_t[:, None], kps + cam_t[:, None], h36m + cam_t[:, None])


def render_image(scenes: Scenes, k: int, faces: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 RGB: person k over a noisy background, through the image camera."""
    H, W = (int(x) for x in scenes.image_hw[k])
    side = 200.0 * scenes.scale[k]
    background = rng.integers(40, 200, (H, W, 3)).astype(np.uint8)
    # the renderer puts a pixel's centre at +0.5, SPIN at the integer index
    out = render(scenes.vertices[k], faces, FOCAL * side / CROP, scenes.center[k] + 0.5, (H, W),
                 part_labels=labels, background=background)
    return out.image


def write_images(scenes: Scenes, names: list[str], images_root: Path, data: SpinData, seed: int) -> None:
    model = data.model()
    labels, faces, rng = part_labels(model), model.faces, np.random.default_rng(seed)
    for k, name in enumerate(names):
        path = Path(images_root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = render_image(scenes, k, faces, labels, rng)
        if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
            raise OSError(f"cannot write {path}")


def place_s(joints17: np.ndarray) -> np.ndarray:
    """(N, 17, 3) H36M17-ordered camera-frame joints in metres -> (N, 24, 4) `S` as h36m.py writes it:
    centred on joint 0, put into rows S_ROWS with confidence 1, every other row zero."""
    S = np.zeros((len(joints17), 24, 4))
    S[:, list(S_ROWS), :3] = joints17 - joints17[:, :1]
    S[:, list(S_ROWS), 3] = 1.0
    return S


def box_rule(points: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, 2) pixels -> center (N, 2) and scale (N,) as SPIN's scripts compute them: the box of
    the points, its longer side times `margin` / 200."""
    lo, hi = points.min(1), points.max(1)
    return (lo + hi) / 2.0, margin * (hi - lo).max(1) / 200.0


# ------------------------------------------------------------------------------------ datasets

@dataclass
class Written:
    path: Path
    scenes: Scenes
    arrays: dict[str, np.ndarray]


def _save(path: Path, scenes: Scenes, **arrays) -> Written:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    with np.load(path, allow_pickle=False) as saved:
        return Written(path, scenes, {k: saved[k] for k in saved.files})


def write_h36m(path: Path, images_root: Path | None, data: SpinData, n: int = 6, seed: int = 0,
               protocol: int = 2) -> Written:
    """h36m_valid_protocol{1,2}.npz (h36m.py): imgname, center, scale, S; the box is 0.9 times the
    body's extent (the script uses the ground-truth mask's box)."""
    scenes = make_scenes(data, n, seed, "vertices", 0.9)
    cams = [H36M_CAMERAS[-1] if protocol == 2 else H36M_CAMERAS[k % 4] for k in range(n)]
    names = [f"images/S9_Directions_1.{c}_{5 * k + 1:06d}.jpg" for k, c in enumerate(cams)]
    if images_root is not None:
        write_images(scenes, names, images_root, data, seed)
    return _save(path, scenes, imgname=names, center=scenes.center.tolist(), scale=scenes.scale.tolist(),
                 S=list(place_s(scenes.h36m)))


def write_mpi_inf_3dhp_test(path: Path, images_root: Path | None, data: SpinData, n: int = 6,
                            seed: int = 1) -> Written:
    """mpi_inf_3dhp_test.npz (mpi_inf_3dhp.py test_data): imgname, center, scale, part, S; the 17
    joints in 2D (conf 1) and 3D go to the same 24 rows; every box inside its image."""
    scenes = make_scenes(data, n, seed, "h36m", 1.2, inside=True)
    names = [f"mpi_inf_3dhp_test_set/TS{1 + k % 6}/imageSequence/img_{k + 1:06d}.jpg" for k in range(n)]
    part = np.zeros((n, 24, 3))
    part[:, list(S_ROWS), :2] = scenes.project(scenes.h36m)
    part[:, list(S_ROWS), 2] = 1.0
    center, scale = box_rule(part[:, list(S_ROWS), :2], 1.2)
    if images_root is not None:
        write_images(scenes, names, images_root, data, seed)
    return _save(path, scenes, imgname=names, center=center.tolist(), scale=scale.tolist(), part=list(part),
                 S=list(place_s(scenes.h36m)))


def write_3dpw_test(path: Path, images_root: Path | None, data: SpinData, n: int = 6, seed: int = 2) -> Written:
    """3dpw_test.npz (pw3d.py): imgname, center, scale, pose, shape, gender ('m' / 'f'); the truth
    mesh is the gendered model's; the box is 1.2 times the 18 OpenPose COCO joints' extent."""
    scenes = make_scenes(data, n, seed, "coco18", 1.2, gendered=True)
    names = [f"imageFiles/downtown_walking_00/image_{k:05d}.jpg" for k in range(n)]
    center, scale = box_rule(scenes.project(scenes.keypoints[:, list(COCO18)]), 1.2)
    if images_root is not None:
        write_images(scenes, names, images_root, data, seed)
    return _save(path, scenes, imgname=names, center=center.tolist(), scale=scale.tolist(),
                 pose=list(scenes.pose), shape=list(scenes.betas), gender=[str(g) for g in scenes.gender])


def spin_transform(point, center, scale, res: int, invert: bool = False) -> np.ndarray:
    """SPIN's utils/imutils.transform: a 1-based pixel through the crop transform, truncated."""
    h = 200.0 * scale
    t = np.array([[res / h, 0.0, res * (-center[0] / h + 0.5)],
                  [0.0, res / h, res * (-center[1] / h + 0.5)],
                  [0.0, 0.0, 1.0]])
    if invert:
        t = np.linalg.inv(t)
    moved = t @ np.array([point[0] - 1.0, point[1] - 1.0, 1.0])
    return moved[:2].astype(int) + 1


def spin_uncrop(image: np.ndarray, center, scale, orig_hw) -> np.ndarray:
    """SPIN's utils/imutils.uncrop for a (res, res) uint8 label map: resized (nearest, as PIL) to
    the box's integer size and pasted into zeros of the original image's shape."""
    res = image.shape[0]
    ul = spin_transform([1, 1], center, scale, res, invert=True) - 1
    br = spin_transform([res + 1, res + 1], center, scale, res, invert=True) - 1
    H, W = int(orig_hw[0]), int(orig_hw[1])
    out = np.zeros((H, W), np.uint8)
    new_x = max(0, -ul[0]), min(br[0], W) - ul[0]
    new_y = max(0, -ul[1]), min(br[1], H) - ul[1]
    old_x = max(0, ul[0]), min(W, br[0])
    old_y = max(0, ul[1]), min(H, br[1])
    resized = cv2.resize(image, (int(br[0] - ul[0]), int(br[1] - ul[1])), interpolation=cv2.INTER_NEAREST_EXACT)
    out[old_y[0]:old_y[1], old_x[0]:old_x[1]] = resized[new_y[0]:new_y[1], new_x[0]:new_x[1]]
    return out


def crop_render(scenes: Scenes, k: int, model: BodyModel) -> tuple[np.ndarray, np.ndarray]:
    """Mask and part labels (224, 224) uint8 of person k in SPIN's crop camera."""
    out = render(scenes.vertices[k], model.faces, FOCAL, (CROP / 2.0, CROP / 2.0), CROP, part_labels=part_labels(model))
    return out.mask.astype(np.uint8), out.parts


def write_lsp_dataset_test(path: Path, images_root: Path | None, upi_root: Path | None, data: SpinData,
                           n: int = 4, seed: int = 3, ignore_band: int = 1) -> Written:
    """lsp_dataset_test.npz (lsp_dataset.py): imgname, maskname, partname, center, scale, part (14
    joints, conf 1); under UPI_ROOT the mask PNGs (0 / 255) and part PNGs (UP-3D's labels 0-6, and
    255, "ignore", on a band `ignore_band` pixels wide along the body's outline) at the image's size."""
    scenes = make_scenes(data, n, seed, "lsp14", 1.2)
    names = [f"images/im{1001 + k:04d}.jpg" for k in range(n)]
    masknames = [f"data/lsp/im{1001 + k:04d}_segmentation.png" for k in range(n)]
    partnames = [f"data/lsp/im{1001 + k:04d}_part_segmentation.png" for k in range(n)]
    part = np.zeros((n, 24, 3))
    part[:, :14, :2] = scenes.project(scenes.keypoints[:, list(LSP14)])
    part[:, :14, 2] = 1.0
    center, scale = box_rule(part[:, :14, :2], 1.2)
    if images_root is not None:
        write_images(scenes, names, images_root, data, seed)
    if upi_root is not None:
        model = data.model()
        for k in range(n):
            mask, parts = crop_render(scenes, k, model)
            full_mask = spin_uncrop(mask, center[k], scale[k], scenes.image_hw[k])
            full_parts = spin_uncrop(parts, center[k], scale[k], scenes.image_hw[k])
            if ignore_band:
                kernel = np.ones((2 * ignore_band + 1,) * 2, np.uint8)
                band = cv2.dilate(full_mask, kernel) != cv2.erode(full_mask, kernel)
                full_parts[band] = 255
            for name, image in ((masknames[k], full_mask * 255), (partnames[k], full_parts)):
                target = Path(upi_root) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(target), image)
    return _save(path, scenes, imgname=names, maskname=masknames, partname=partnames,
                 center=center.tolist(), scale=scale.tolist(), part=list(part))


# Keys, per-row shapes and dtype kinds that SPIN's scripts write (np.savez of Python lists).
EXPECTED_FORMATS: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {
    "h36m_valid_protocol2.npz": {"imgname": ((), "U"), "center": ((2,), "f8"), "scale": ((), "f8"),
                                 "S": ((24, 4), "f8")},
    "mpi_inf_3dhp_test.npz": {"imgname": ((), "U"), "center": ((2,), "f8"), "scale": ((), "f8"),
                              "part": ((24, 3), "f8"), "S": ((24, 4), "f8")},
    "3dpw_test.npz": {"imgname": ((), "U"), "center": ((2,), "f8"), "scale": ((), "f8"),
                      "pose": ((72,), "f8"), "shape": ((10,), "f8"), "gender": ((), "U")},
    "lsp_dataset_test.npz": {"imgname": ((), "U"), "maskname": ((), "U"), "partname": ((), "U"),
                             "center": ((2,), "f8"), "scale": ((), "f8"), "part": ((24, 3), "f8")},
}
