"""Small files in the formats that a user of SPIN brings, written by the tests themselves (no
licensed data): SPIN's preprocessed training and evaluation `.npz` files with their images,
SMPLify's `gmm_08.pkl`, a regressor checkpoint in SPIN's key layout, an OpenPose BODY_25 output
folder and a COCO person-keypoints file.

Every person is the built-in body model, posed by the project's pose sampler and rendered into a
full-size image through a pinhole camera (y down, looking down +z), so that one record's 2D
keypoints, 3D joints, SMPL parameters, mask and part labels agree with each other and with its
pixels. Coordinates are those of SPIN's files: 0-based pixels (a pixel's centre is an integer),
metres, `S` centred on the pelvis; the layouts, keys and dtypes are what SPIN's
`datasets/preprocess/*.py` write (`np.savez` of Python lists: float64 arrays, unicode strings).
"""
from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision

from fitting.body_model import BodyModel, load_body_model
from fitting.camera import perspective_projection
from fitting.keypoints import GT24, KEYPOINT_NAMES, OP25
from fitting.pose_sampler import sample_body_poses
from fitting.priors import builtin_prior_path
from fitting.render import part_labels, render

# --------------------------------------------------------------------------- SPIN's tables

# J24 rows that each source fills (SPIN's preprocess scripts); every other row is (0, 0, 0).
LSP14_ROWS = tuple(range(14))
# H36M and MPI-INF-3DHP write their 17 joints to these rows (`global_idx` in h36m_train.py).
H36M_ROWS = (14, 3, 4, 5, 2, 1, 0, 16, 12, 17, 18, 9, 10, 11, 8, 7, 6)
PELVIS_J24 = 14                       # "Pelvis (MPII)": S is centred on it
# COCO-17 keypoint k -> J24 row (SPIN's coco.py `joints_idx`).
COCO_TO_J24 = (19, 20, 21, 22, 23, 9, 8, 10, 7, 11, 6, 3, 2, 4, 1, 5, 0)
COCO_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
COCO_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
SPIN_TRAIN_FILES = {
    "h36m": "h36m_train.npz", "lsp-orig": "lsp_dataset_original_train.npz", "mpii": "mpii_train.npz",
    "lspet": "hr-lspet_train.npz", "coco": "coco_2014_train.npz", "mpi-inf-3dhp": "mpi_inf_3dhp_train.npz",
}


# --------------------------------------------------------------------------- rendered people

@dataclass(frozen=True)
class Person:
    """One rendered person, in the source image's coordinates."""
    pose: np.ndarray        # (72,) axis-angle, global orientation in the camera frame
    betas: np.ndarray       # (10,)
    keypoints: np.ndarray   # (49, 3) 0-based pixels, confidence 1 where inside the image
    joints3d: np.ndarray    # (49, 3) camera frame, metres (translation included)
    mask: np.ndarray        # (H, W) bool, the pixels this person covers in the final image
    parts: np.ndarray       # (H, W) uint8 part labels 0..6 (0: background or another person)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray       # (H, W, 3) uint8 RGB
    people: tuple[Person, ...]
    focal: float


@lru_cache(maxsize=1)
def _body() -> tuple[BodyModel, np.ndarray]:
    model = load_body_model()
    return model, part_labels(model)


def _orientation(yaw: float) -> np.ndarray:
    """(3,) axis-angle: SMPL's y-up body turned upright in the y-down camera, then `yaw`."""
    flip = cv2.Rodrigues(np.array([np.pi, 0.0, 0.0]))[0]
    turn = cv2.Rodrigues(np.array([0.0, yaw, 0.0]))[0]
    return cv2.Rodrigues(flip @ turn)[0][:, 0]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(40, 200, size=3)
    ramp = rng.uniform(-60, 60, size=(2, 3))
    image = base + xx[..., None] * ramp[0] + yy[..., None] * ramp[1]
    return np.clip(image + rng.normal(0, 6, size=image.shape), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: tuple[int, int] = (160, 200), people: int = 1,
                 focal: float = 320.0) -> Scene:
    """`people` bodies standing side by side (nearer ones drawn last) in an image of `size`
    (H, W); each keeps its own mask and part labels of the pixels it finally covers."""
    model, labels = _body()
    height, width = size
    center = np.array([width / 2.0, height / 2.0])
    body_poses = sample_body_poses(people, rng)
    betas = np.clip(rng.normal(0.0, 0.8, size=(people, 10)), -2.5, 2.5).astype(np.float32)
    slots = (np.arange(people) + 0.5) / people - 0.5          # -0.5..0.5 across the image
    depth = focal * 1.75 / (0.78 * height) + rng.uniform(-0.3, 0.3, size=people)
    order = np.argsort(-depth)                                 # far first
    image = _background(rng, height, width)
    owner = np.full((height, width), -1)
    part_map = np.zeros((height, width), dtype=np.uint8)
    rendered = {}
    for i in order:
        pose = np.concatenate([_orientation(rng.uniform(-0.8, 0.8)), body_poses[i]]).astype(np.float32)
        with torch.no_grad():
            out = model(torch.tensor(pose[None]), torch.tensor(betas[i][None]))
        pelvis = out.keypoints[0, 25 + PELVIS_J24].numpy()
        lateral = slots[i] * width * depth[i] / focal * (0.9 if people > 1 else 0.3)
        transl = np.array([lateral, 0.05 + rng.uniform(-0.05, 0.05), depth[i]]) - pelvis * [1, 1, 0]
        vertices = out.vertices[0].numpy() + transl
        frame = render(vertices, model.faces, focal, center, (height, width), part_labels=labels)
        image[frame.mask] = frame.image[frame.mask]
        owner[frame.mask] = i
        part_map[frame.mask] = frame.parts[frame.mask]
        joints = out.keypoints[0].numpy() + transl
        px = perspective_projection(torch.tensor(joints[None]), torch.zeros(1, 3), focal,
                                    torch.tensor(center[None]))[0].numpy() - 0.5  # 0-based pixels
        inside = (px[:, 0] >= 0) & (px[:, 0] <= width - 1) & (px[:, 1] >= 0) & (px[:, 1] <= height - 1)
        rendered[i] = (pose, np.concatenate([px, inside[:, None].astype(np.float64)], axis=1), joints)
    result = []
    for i in range(people):
        pose, keypoints, joints = rendered[i]
        mask = owner == i
        result.append(Person(pose=pose, betas=betas[i], keypoints=keypoints, joints3d=joints,
                             mask=mask, parts=np.where(mask, part_map, 0).astype(np.uint8)))
    return Scene(image=image, people=tuple(result), focal=focal)


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
        raise OSError(f"could not write {path}")


def write_truncated_image(path: Path, image: np.ndarray) -> None:
    """A JPEG cut off half way, as a failed copy leaves it."""
    ok, buffer = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.tobytes()[: len(buffer) // 2])


# --------------------------------------------------------------------------- SPIN's fields

def box_center_scale(points: np.ndarray, factor: float) -> tuple[list[float], float]:
    """SPIN's rule for a box from (N, 2) points: the centre of their extent and
    factor * max(width, height) / 200."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return [float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2)], float(factor * max(hi - lo) / 200.0)


def mask_center_scale(mask: np.ndarray, factor: float = 0.9) -> tuple[list[float], float]:
    """SPIN's H36M box: [min x, min y, max x + 1, max y + 1] of the mask, scaled by 0.9."""
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
    return box_center_scale(box.reshape(2, 2), factor)


def part_array(person: Person, rows: tuple[int, ...]) -> np.ndarray:
    """(24, 3) SPIN `part`: the J24 `rows` with confidence 1 (whether or not visible, as SPIN's
    scripts ignore visibility), every other row zero."""
    part = np.zeros((24, 3))
    gt = person.keypoints[list(GT24)]
    part[list(rows), :2] = gt[list(rows), :2]
    part[list(rows), 2] = 1.0
    return part


def s_array(person: Person, rows: tuple[int, ...] = H36M_ROWS) -> np.ndarray:
    """(24, 4) SPIN `S`: the J24 `rows` in metres centred on the pelvis, confidence 1."""
    joints = person.joints3d[list(GT24)]
    S = np.zeros((24, 4))
    S[list(rows), :3] = joints[list(rows)] - joints[PELVIS_J24]
    S[list(rows), 3] = 1.0
    return S


def openpose_array(person: Person, rng: np.random.Generator, noise_px: float = 1.5,
                   miss: float = 0.15) -> np.ndarray:
    """(25, 3) BODY_25 detections of a person: noisy positions, confidences in (0.3, 0.95),
    some joints undetected (0, 0, 0)."""
    op = person.keypoints[list(OP25)].copy()
    op[:, :2] += rng.normal(0.0, noise_px, size=(25, 2))
    op[:, 2] = np.where(op[:, 2] > 0, rng.uniform(0.3, 0.95, size=25), 0.0)
    op[rng.random(25) < miss] = 0.0
    op[op[:, 2] == 0] = 0.0
    return op


def _save_npz(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # as SPIN's scripts do: np.savez of Python lists
    np.savez(path, **{k: (list(v) if not isinstance(v, list) else v) for k, v in arrays.items()})
    return path


@dataclass(frozen=True)
class Written:
    """What a writer produced: the .npz (or .json) file, the folder its names are relative to,
    and the people in file order (for checks against ground truth)."""
    file: Path
    images: Path
    people: tuple[Person, ...]


def _scenes(seed: int, n: int, size: tuple[int, int]) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [render_scene(rng, size) for _ in range(n)]


def _damage(root: Path, names: list[str], scenes: list[Scene], missing: tuple[int, ...],
            truncated: tuple[int, ...]) -> None:
    for i, (name, scene) in enumerate(zip(names, scenes)):
        if i in missing:
            continue
        (write_truncated_image if i in truncated else write_image)(root / name, scene.image)


def write_lsp_original_train(out: Path, n: int = 10, seed: int = 0, missing: tuple[int, ...] = (),
                             truncated: tuple[int, ...] = ()) -> Written:
    """`lsp_dataset_original_train.npz` (imgname, center, scale, part, openpose) and
    `lsp_dataset_original/images/im%04d.jpg`; rows in `missing` have no image file and rows in
    `truncated` a cut-off JPEG."""
    root = out / "lsp_dataset_original"
    scenes = _scenes(seed, n, (180, 140))
    rng = np.random.default_rng(seed + 1)
    people = [s.people[0] for s in scenes]
    names = [f"images/im{i + 1:04d}.jpg" for i in range(n)]
    _damage(root, names, scenes, missing, truncated)
    boxes = [box_center_scale(part_array(p, LSP14_ROWS)[:14, :2], 1.2) for p in people]
    path = _save_npz(
        out / "lsp_dataset_original_train.npz", imgname=names, center=[b[0] for b in boxes],
        scale=[b[1] for b in boxes], part=[part_array(p, LSP14_ROWS) for p in people],
        openpose=[openpose_array(p, rng) for p in people],
    )
    return Written(path, root, tuple(people))


def write_h36m_train(out: Path, n: int = 8, seed: int = 10, without_smpl: tuple[int, ...] = (1,)) -> Written:
    """`h36m_train.npz` as SPIN trained on it: imgname, center, scale (0.9 x the mask box),
    part (17 rows), S, openpose, and the MoSh pose, shape and has_smpl (0 for `without_smpl`)."""
    root = out / "h36m"
    scenes = _scenes(seed, n, (160, 160))
    rng = np.random.default_rng(seed + 1)
    people = [s.people[0] for s in scenes]
    actions = ("Directions_1", "Eating", "Posing_1", "Walking")
    names = [f"images/S1_{actions[i % 4]}.54138969_{5 * i + 1:06d}.jpg" for i in range(n)]
    _damage(root, names, scenes, (), ())
    boxes = [mask_center_scale(p.mask) for p in people]
    path = _save_npz(
        out / "h36m_train.npz", imgname=names, center=[b[0] for b in boxes], scale=[b[1] for b in boxes],
        part=[part_array(p, H36M_ROWS) for p in people], S=[s_array(p) for p in people],
        openpose=[openpose_array(p, rng) for p in people],
        pose=[p.pose.astype(np.float64) for p in people], shape=[p.betas.astype(np.float64) for p in people],
        has_smpl=[0.0 if i in without_smpl else 1.0 for i in range(n)],
    )
    return Written(path, root, tuple(people))


def write_3dpw_test(out: Path, n: int = 6, seed: int = 20) -> Written:
    """`3dpw_test.npz` (imgname, center, scale, pose, shape, gender as 'm'/'f'): no 2D keypoints,
    no S; the box from the visible 2D joints, scaled by 1.2."""
    root = out / "3dpw"
    scenes = _scenes(seed, n, (200, 150))
    people = [s.people[0] for s in scenes]
    names = [f"imageFiles/courtyard_basketball_00/image_{i:05d}.jpg" for i in range(n)]
    _damage(root, names, scenes, (), ())
    boxes = []
    for p in people:
        visible = p.keypoints[list(GT24)][:14]
        boxes.append(box_center_scale(visible[visible[:, 2] > 0, :2], 1.2))
    path = _save_npz(
        out / "3dpw_test.npz", imgname=names, center=[b[0] for b in boxes], scale=[b[1] for b in boxes],
        pose=[p.pose.astype(np.float64) for p in people], shape=[p.betas.astype(np.float64) for p in people],
        gender=["m" if i % 2 == 0 else "f" for i in range(n)],
    )
    return Written(path, root, tuple(people))


def write_lsp_test_with_masks(out: Path, n: int = 4, seed: int = 30) -> tuple[Written, Path]:
    """`lsp_dataset_test.npz` (imgname, maskname, partname, center, scale, part) with images under
    `lsp_dataset/` and the mask and part PNGs under a second root, `upi-s1h/` (as SPIN keeps them:
    `data/lsp/im%04d_segmentation.png`, `..._part_segmentation.png`). Returns (written, mask root)."""
    root, masks = out / "lsp_dataset", out / "upi-s1h"
    scenes = _scenes(seed, n, (150, 120))
    people = [s.people[0] for s in scenes]
    names = [f"images/im{1001 + i:04d}.jpg" for i in range(n)]
    _damage(root, names, scenes, (), ())
    masknames = [f"data/lsp/im{1001 + i:04d}_segmentation.png" for i in range(n)]
    partnames = [f"data/lsp/im{1001 + i:04d}_part_segmentation.png" for i in range(n)]
    for person, mask_name, part_name in zip(people, masknames, partnames):
        (masks / mask_name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(masks / mask_name), person.mask.astype(np.uint8) * 255)
        cv2.imwrite(str(masks / part_name), person.parts)
    boxes = [box_center_scale(part_array(p, LSP14_ROWS)[:14, :2], 1.2) for p in people]
    path = _save_npz(
        out / "lsp_dataset_test.npz", imgname=names, maskname=masknames, partname=partnames,
        center=[b[0] for b in boxes], scale=[b[1] for b in boxes],
        part=[part_array(p, LSP14_ROWS) for p in people],
    )
    return Written(path, root, tuple(people)), masks


# --------------------------------------------------------------------------- in-the-wild inputs

def openpose_person(keypoints25: np.ndarray) -> dict:
    """One entry of OpenPose's `people` list (BODY_25 body, empty face and hands)."""
    return {
        "person_id": [-1],
        "pose_keypoints_2d": [round(float(v), 3) for v in np.asarray(keypoints25).reshape(-1)],
        "face_keypoints_2d": [], "hand_left_keypoints_2d": [], "hand_right_keypoints_2d": [],
        "pose_keypoints_3d": [], "face_keypoints_3d": [], "hand_left_keypoints_3d": [],
        "hand_right_keypoints_3d": [],
    }


@dataclass(frozen=True)
class OpenPoseFolder:
    images: Path
    keypoints: Path
    detections: dict[str, list[np.ndarray]]  # image name -> (25, 3) per person in JSON order
    people: dict[str, tuple[Person, ...]]


def write_openpose_folder(out: Path, seed: int = 40, faint: float = 0.1) -> OpenPoseFolder:
    """OpenPose's output for three images, as `openpose --write_json` leaves it:
    `images/` and `keypoints/<stem>_keypoints.json`.
      - `two_people.jpg`: two detected people;
      - `one_person.jpg`: one person, plus a spurious detection whose confidences are all `faint`;
      - `nobody.jpg`: an empty `people` list."""
    rng = np.random.default_rng(seed)
    images, keypoints = out / "images", out / "keypoints"
    scenes = {"two_people.jpg": render_scene(rng, (160, 240), people=2),
              "one_person.jpg": render_scene(rng, (180, 140), people=1),
              "nobody.jpg": Scene(_background(rng, 120, 120), (), 320.0)}
    detections: dict[str, list[np.ndarray]] = {}
    for name, scene in scenes.items():
        write_image(images / name, scene.image)
        found = [openpose_array(p, rng, miss=0.05) for p in scene.people]
        if name == "one_person.jpg":
            ghost = found[0].copy()
            ghost[:, :2] += rng.uniform(-20, 20, size=2)
            ghost[ghost[:, 2] > 0, 2] = faint
            found.append(ghost)
        found = [np.round(d, 3) for d in found]  # as the JSON holds them
        detections[name] = found
        keypoints.mkdir(parents=True, exist_ok=True)
        document = {"version": 1.3, "people": [openpose_person(d) for d in found]}
        (keypoints / f"{Path(name).stem}_keypoints.json").write_text(json.dumps(document))
    return OpenPoseFolder(images, keypoints, detections, {k: s.people for k, s in scenes.items()})


@dataclass(frozen=True)
class CocoFile:
    file: Path
    images: Path
    annotations: list[dict]   # as written, in file order
    people: list[Person]      # the person of each annotation


def _coco_keypoints(person: Person, occluded: tuple[int, ...] = (), unlabelled: tuple[int, ...] = ()) -> list[int]:
    gt = person.keypoints[list(GT24)]
    out = []
    for k, row in enumerate(COCO_TO_J24):
        x, y, inside = gt[row]
        v = 0 if (k in unlabelled or not inside) else (1 if k in occluded else 2)
        out += [int(round(x)), int(round(y)), v] if v else [0, 0, 0]
    return out


def write_coco_keypoints(out: Path, seed: int = 50) -> CocoFile:
    """`annotations/person_keypoints_train2014.json` and `train2014/*.jpg`: three images, four
    person annotations. Annotation 2 has an occluded (v=1) but labelled elbow, which SPIN keeps;
    annotation 3 lacks its left ankle (v=0), so SPIN's rule (all 12 body joints labelled) drops it."""
    rng = np.random.default_rng(seed)
    images = out / "train2014"
    scenes = [render_scene(rng, (160, 240), people=2), render_scene(rng, (170, 130)),
              render_scene(rng, (150, 150))]
    coco_images, annotations, people = [], [], []
    for index, scene in enumerate(scenes):
        image_id = 9 + 100 * index
        name = f"COCO_train2014_{image_id:012d}.jpg"
        write_image(images / name, scene.image)
        height, width = scene.image.shape[:2]
        coco_images.append({"id": image_id, "file_name": name, "height": height, "width": width,
                            "license": 1, "coco_url": "", "flickr_url": "", "date_captured": ""})
        for person in scene.people:
            number = len(annotations) + 1
            occluded = (7,) if number == 2 else ()
            unlabelled = (15,) if number == 3 else ()
            ys, xs = np.nonzero(person.mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            contours, _ = cv2.findContours(person.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            polygon = max(contours, key=cv2.contourArea).reshape(-1).astype(float).tolist()
            keypoints = _coco_keypoints(person, occluded, unlabelled)
            annotations.append({
                "id": 1000 + number, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "keypoints": keypoints, "num_keypoints": int(sum(v > 0 for v in keypoints[2::3])),
                "bbox": box, "area": float(person.mask.sum()), "segmentation": [polygon],
            })
            people.append(person)
    document = {
        "info": {"description": "spin-pipeline test fixture", "version": "1.0", "year": 2014},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": coco_images, "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person",
                        "keypoints": list(COCO_NAMES), "skeleton": [list(b) for b in COCO_SKELETON]}],
    }
    path = out / "annotations" / "person_keypoints_train2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return CocoFile(path, images, annotations, people)


# --------------------------------------------------------------------------- gmm_08.pkl

class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: strings and bytes as BINSTRING (py2 `str`), numpy under
    its old module name (`numpy.core.multiarray`), builtins under `__builtin__`."""

    def save_bytes(self, obj: bytes) -> None:
        header = (pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256
                  else pickle.BINSTRING + struct.pack("<i", len(obj)))
        self.write(header + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin-1"))

    def save_global(self, obj, name=None) -> None:
        module = getattr(obj, "__module__", None) or "__main__"
        name = name or obj.__qualname__
        module = {"builtins": "__builtin__"}.get(module, module.replace("numpy._core", "numpy.core"))
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[type] = save_global


def write_gmm_08_pkl(path: Path, arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """SMPLify's `gmm_08.pkl`: a dict of float64 `means` (8, 69), `covars` (8, 69, 69) and
    `weights` (8,), pickled by Python 2 (protocol 2, read with encoding='latin1'). The content is
    the built-in prior's unless `arrays` is given. Returns what was written."""
    if arrays is None:
        with np.load(builtin_prior_path()) as data:
            arrays = {k: data[k] for k in ("means", "covars", "weights")}
    content = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        _Python2Pickler(fh, protocol=2).dump(content)
    return content


# --------------------------------------------------------------------------- SPIN's checkpoint

def spin_hmr_state(seed: int = 0, mean_pose_6d: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """SPIN's HMR `state_dict`: torchvision ResNet-50 keys without `fc.*` (318 entries), the head
    fc1 (1024, 2205), fc2, decpose (144), decshape (10), deccam (3), and the buffers init_pose
    (1, 144), init_shape (1, 10), init_cam (1, 3). Random weights; init_pose is SPIN's 6D layout
    of `mean_pose_6d` (default: upright, arms down)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = torchvision.models.resnet50(weights=None)
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    for name, (rows, cols) in (("fc1", (1024, 2048 + 144 + 13)), ("fc2", (1024, 1024)),
                               ("decpose", (144, 1024)), ("decshape", (10, 1024)), ("deccam", (3, 1024))):
        bound = 1.0 / np.sqrt(cols) * (0.01 if name.startswith("dec") else 1.0)
        state[f"{name}.weight"] = (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound
        state[f"{name}.bias"] = (torch.rand(rows, generator=generator) * 2 - 1) * bound
    if mean_pose_6d is None:
        rotmats = np.tile(np.eye(3), (24, 1, 1))
        rotmats[0] = cv2.Rodrigues(np.array([np.pi, 0.0, 0.0]))[0]
        mean_pose_6d = rotmats[:, :, :2].reshape(144)  # SPIN's 6D: the (3, 2) first columns, row-major
    state["init_pose"] = torch.tensor(np.asarray(mean_pose_6d), dtype=torch.float32).reshape(1, 144)
    state["init_shape"] = torch.zeros(1, 10)
    state["init_cam"] = torch.tensor([[0.9, 0.0, 0.0]])
    return state


def write_spin_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """`model_checkpoint.pt` as SPIN's CheckpointSaver writes it (torch 1.x legacy format): model,
    optimizer (Adam, no steps taken), epoch, batch_idx, batch_size, dataset_perm,
    total_step_count. Returns the model state."""
    state = spin_hmr_state(seed)
    params = list(range(len([k for k in state if not k.startswith("init_") and "running_" not in k
                             and "num_batches" not in k])))
    optimizer = {"state": {}, "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8,
                                                "weight_decay": 0, "amsgrad": False, "params": params}]}
    checkpoint = {"model": state, "optimizer": optimizer, "epoch": 49, "batch_idx": 0, "batch_size": 64,
                  "dataset_perm": None, "total_step_count": 1000}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return state


def spin_rot6d_to_rotmat(x: torch.Tensor) -> torch.Tensor:
    """SPIN's `rot6d_to_rotmat`, written out: (B, 6k) -> (B*k, 3, 3); the 6 numbers are a (3, 2)
    row-major matrix whose columns are Gram-Schmidt'ed into the rotation's first two columns."""
    x = x.reshape(-1, 3, 2)
    a1, a2 = x[:, :, 0], x[:, :, 1]
    b1 = torch.nn.functional.normalize(a1, dim=1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(dim=1, keepdim=True) * b1, dim=1)
    return torch.stack([b1, b2, torch.cross(b1, b2, dim=1)], dim=-1)


def spin_hmr_forward(state: dict[str, torch.Tensor], images: torch.Tensor, n_iter: int = 3):
    """SPIN's HMR forward (eval mode) from its state dict, as a reference:
    images (B, 3, 224, 224) ImageNet-normalized -> (rotmat (B, 24, 3, 3), betas (B, 10), cam (B, 3))."""
    backbone = torchvision.models.resnet50(weights=None)
    backbone.fc = torch.nn.Identity()
    backbone.load_state_dict({k: v for k, v in state.items() if k.split(".")[0].startswith(("conv1", "bn1", "layer"))})
    backbone.eval()
    with torch.no_grad():
        features = backbone(images)
        batch = len(images)
        pose, shape, cam = (state[k].expand(batch, -1) for k in ("init_pose", "init_shape", "init_cam"))
        linear = torch.nn.functional.linear
        for _ in range(n_iter):
            xc = torch.cat([features, pose, shape, cam], dim=1)
            xc = linear(linear(xc, state["fc1.weight"], state["fc1.bias"]), state["fc2.weight"], state["fc2.bias"])
            pose = pose + linear(xc, state["decpose.weight"], state["decpose.bias"])
            shape = shape + linear(xc, state["decshape.weight"], state["decshape.bias"])
            cam = cam + linear(xc, state["deccam.weight"], state["deccam.bias"])
    return spin_rot6d_to_rotmat(pose).reshape(batch, 24, 3, 3), shape, cam


# --------------------------------------------------------------------------- everything at once

@dataclass(frozen=True)
class BringYourOwn:
    """One folder of everything a SPIN user brings (the end-to-end test's inputs)."""
    lsp: Written
    h36m: Written
    pw3d: Written
    openpose: OpenPoseFolder
    coco: CocoFile
    gmm_pkl: Path
    checkpoint: Path


def write_bring_your_own(out: Path, lsp_rows: int = 10, h36m_rows: int = 8, pw3d_rows: int = 6,
                         checkpoint: bool = True) -> BringYourOwn:
    """Write every fixture under `out` (a few seconds; the checkpoint is ~100 MB of ResNet-50)."""
    ckpt = out / "data" / "model_checkpoint.pt"
    if checkpoint:
        write_spin_checkpoint(ckpt)
    gmm = out / "data" / "gmm_08.pkl"
    write_gmm_08_pkl(gmm)
    return BringYourOwn(
        lsp=write_lsp_original_train(out / "datasets", lsp_rows), h36m=write_h36m_train(out / "datasets", h36m_rows),
        pw3d=write_3dpw_test(out / "datasets", pw3d_rows), openpose=write_openpose_folder(out / "openpose"),
        coco=write_coco_keypoints(out / "coco"), gmm_pkl=gmm, checkpoint=ckpt,
    )


def _check() -> None:
    assert len(COCO_TO_J24) == 17 and KEYPOINT_NAMES[25 + PELVIS_J24] == "Pelvis (MPII)"


_check()
