"""In-the-wild inputs as the arrays of a SPIN dataset file: an OpenPose BODY_25 output folder and
a COCO person-keypoints file.

Both become what a SPIN `.npz` holds (imgname, center, scale, part, openpose), one row per person,
so that they go through the same crop and checks as SPIN's own files (`trainer.data.ingest`). A
row that cannot become a sample keeps its place with a reason, which ingest quarantines; nothing
is dropped without a trace.

OpenPose: SPIN's demo (`bbox_from_openpose`) takes the keypoints with confidence above 0.2, centres
the box on their mean and makes its side 1.2 times their larger extent. Here every detected
person is a row, not only the first one.

COCO: SPIN's `datasets/preprocess/coco.py` rules: a keypoint labelled at all (v > 0, visible or
not) has confidence 1; a person is kept only when all 12 limb joints (shoulders to ankles) are
labelled; the box is the annotation's `bbox` with the 1.2 margin. `iscrowd` is not read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fitting.errors import BadInput
from fitting.keypoints import COCO17_NAMES, COCO17_TO_KEYPOINTS, NUM_KEYPOINTS, OP25

OPENPOSE_MIN_CONFIDENCE = 0.2    # SPIN demo's detection threshold (strictly above)
BOX_MARGIN = 1.2                 # SPIN's box enlargement, for OpenPose and COCO alike
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# COCO's limb joints, shoulders to ankles: SPIN keeps a person only when all are labelled
COCO_LIMBS: tuple[int, ...] = tuple(range(5, 17))


@dataclass(frozen=True)
class PersonRows:
    """SPIN-file arrays, one row per person, and per row the reason it is no sample (or None).

    arrays: imgname (N,) str, center (N, 2), scale (N,), part (N, 24, 3), openpose (N, 25, 3),
    all in source-image pixels as SPIN's files keep them; a row with a reason has NaN box values."""
    arrays: dict[str, np.ndarray]
    reasons: list[str | None]


def _rows(records: list[tuple[str, np.ndarray | None, float, np.ndarray, np.ndarray, str | None]]) -> PersonRows:
    n = len(records)
    arrays = {
        "imgname": np.array([r[0] for r in records], dtype=str),
        "center": np.array([r[1] if r[1] is not None else (np.nan, np.nan) for r in records], dtype=np.float64).reshape(n, 2),
        "scale": np.array([r[2] for r in records], dtype=np.float64).reshape(n),
        "part": np.array([r[3] for r in records], dtype=np.float64).reshape(n, 24, 3),
        "openpose": np.array([r[4] for r in records], dtype=np.float64).reshape(n, 25, 3),
    }
    return PersonRows(arrays, [r[5] for r in records])


def _empty_person() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((24, 3)), np.zeros((25, 3))


def keypoint_box(points: np.ndarray, margin: float = BOX_MARGIN) -> tuple[np.ndarray, float] | None:
    """SPIN's demo box from (N, 2) points: centre at their mean, side `margin` times their larger
    extent (scale = side / 200). None when the points span no area."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 2:
        return None
    extent = float((points.max(axis=0) - points.min(axis=0)).max())
    if not np.isfinite(extent) or extent <= 0:
        return None
    return points.mean(axis=0), margin * extent / 200.0


def openpose_people(document: object) -> list[np.ndarray]:
    """The (25, 3) BODY_25 keypoints of every person in one OpenPose JSON document.
    BadInput (one line) when the document is not OpenPose's or a person is not BODY_25."""
    if not isinstance(document, dict) or not isinstance(document.get("people"), list):
        raise BadInput("not an OpenPose keypoints file (no 'people' list)")
    people = []
    for index, person in enumerate(document["people"]):
        # OpenPose before 1.2 wrote 'pose_keypoints'
        values = person.get("pose_keypoints_2d", person.get("pose_keypoints")) if isinstance(person, dict) else None
        if values is None:
            raise BadInput(f"person {index} has no pose_keypoints_2d")
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if flat.size != 25 * 3:
            raise BadInput(f"person {index} has {flat.size // 3} keypoints, expected BODY_25's 25 "
                           f"(run OpenPose with --model_pose BODY_25)")
        if not np.isfinite(flat).all():
            raise BadInput(f"person {index} has non-finite keypoints")
        people.append(flat.reshape(25, 3))
    return people


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"unreadable JSON ({' '.join(str(exc).split())[:120]})") from None


def image_files(images_dir: Path) -> list[Path]:
    """The images directly inside a folder, sorted by name."""
    return sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def openpose_rows(images_dir: str | Path, keypoints_dir: str | Path,
                  min_confidence: float = OPENPOSE_MIN_CONFIDENCE, min_keypoints: int = 6) -> PersonRows:
    """One row per person that OpenPose found in each image of `images_dir` (its JSON is
    `keypoints_dir/<image stem>_keypoints.json`). Keypoints at or below `min_confidence` count as
    undetected (position and confidence zero). A person with fewer than `min_keypoints` detected
    keypoints, an image without people and an image without a readable JSON file are rows with a
    reason. BadInput when a folder is missing or holds no images."""
    images_dir, keypoints_dir = Path(images_dir), Path(keypoints_dir)
    for folder, what in ((images_dir, "image"), (keypoints_dir, "OpenPose keypoints")):
        if not folder.is_dir():
            raise BadInput(f"{what} folder not found: {folder}")
    if not 0 <= min_confidence < 1 or min_keypoints < 2:
        raise BadInput("--min-confidence must be in [0, 1) and the keypoints needed for a box >= 2")
    images = image_files(images_dir)
    if not images:
        raise BadInput(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    records = []
    for image in images:
        name = image.name
        json_path = keypoints_dir / f"{image.stem}_keypoints.json"
        part, blank = _empty_person()
        if not json_path.is_file():
            records.append((name, None, np.nan, part, blank, f"no OpenPose file ({json_path.name})"))
            continue
        try:
            people = openpose_people(_read_json(json_path))
        except BadInput as exc:
            records.append((name, None, np.nan, part, blank, f"unreadable OpenPose file ({json_path.name}: {exc})"))
            continue
        if not people:
            records.append((name, None, np.nan, part, blank, "OpenPose found no person"))
        for index, keypoints in enumerate(people):
            detected = keypoints[:, 2] > min_confidence
            keypoints = np.where(detected[:, None], keypoints, 0.0)
            box = keypoint_box(keypoints[detected, :2]) if detected.sum() >= min_keypoints else None
            if box is None:
                reason = (f"too few detected keypoints (person {index}: {int(detected.sum())} above confidence "
                          f"{min_confidence}, < {min_keypoints})" if detected.sum() < min_keypoints
                          else f"keypoints span no area (person {index})")
                records.append((name, None, np.nan, part, keypoints, reason))
            else:
                records.append((name, box[0], box[1], part, keypoints, None))
    return _rows(records)


def _coco_person(annotation: dict, images: dict[int, dict]) -> tuple[str, np.ndarray | None, float, np.ndarray, str | None]:
    """(imgname, center, scale, part (24, 3), reason) of one COCO person annotation."""
    part = np.zeros((24, 3))
    image = images.get(annotation.get("image_id"))
    if image is None:
        return "", None, np.nan, part, (f"image not in the file (annotation {annotation.get('id')}: "
                                        f"image_id {annotation.get('image_id')})")
    name = str(image.get("file_name", ""))
    flat = np.asarray(annotation.get("keypoints", []), dtype=np.float64).reshape(-1)
    if flat.size != 17 * 3 or not np.isfinite(flat).all():
        return name, None, np.nan, part, f"bad keypoints (annotation {annotation.get('id')}: not 17 finite (x, y, v))"
    coco = flat.reshape(17, 3)
    labelled = coco[:, 2] > 0  # SPIN: labelled but not visible (v = 1) counts
    rows = np.asarray(COCO17_TO_KEYPOINTS) - (NUM_KEYPOINTS - 24)
    part[rows, :2] = np.where(labelled[:, None], coco[:, :2], 0.0)
    part[rows, 2] = labelled
    missing = [COCO17_NAMES[k] for k in COCO_LIMBS if not labelled[k]]
    if missing:
        return name, None, np.nan, part, (f"limb joints not labelled (annotation {annotation.get('id')}: "
                                          f"{', '.join(missing)}; SPIN keeps only people with all 12)")
    box = np.asarray(annotation.get("bbox", []), dtype=np.float64).reshape(-1)
    if box.size != 4 or not np.isfinite(box).all() or box[2] <= 0 or box[3] <= 0:
        return name, None, np.nan, part, f"bad bbox (annotation {annotation.get('id')}: not [x, y, w, h] with w, h > 0)"
    x, y, w, h = box
    return name, np.array([x + w / 2.0, y + h / 2.0]), BOX_MARGIN * max(w, h) / 200.0, part, None


def coco_rows(path: str | Path) -> PersonRows:
    """One row per person annotation (category 'person') of a COCO keypoints file, in file order;
    imgname is the image's file_name. BadInput when the file is missing or not a COCO keypoints file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"COCO file not found: {path}")
    try:
        document = _read_json(path)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    if not isinstance(document, dict) or not all(isinstance(document.get(k), list) for k in ("images", "annotations")):
        raise BadInput(f"{path}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
    categories = [c for c in document.get("categories", []) if isinstance(c, dict)]
    person_ids = {c.get("id") for c in categories if c.get("name") == "person"} or {1}
    images = {i.get("id"): i for i in document["images"] if isinstance(i, dict)}
    annotations = [a for a in document["annotations"] if isinstance(a, dict) and a.get("category_id") in person_ids]
    if not annotations:
        raise BadInput(f"{path}: no person annotations")
    records = []
    for annotation in annotations:
        name, center, scale, part, reason = _coco_person(annotation, images)
        records.append((name, center, scale, part, np.zeros((len(OP25), 3)), reason))
    return _rows(records)


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of an image file, or None when it cannot be decoded."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if image is None else image.shape[:2]


def whole_image_rows(images: list[Path]) -> PersonRows:
    """One row per image, its box the whole image: SPIN's demo without a person box (centre
    (W // 2, H // 2), side the longer image side). An unreadable image is a row with a reason."""
    records = []
    for path in images:
        part, blank = _empty_person()
        size = image_size(path)
        if size is None:
            records.append((path.name, None, np.nan, part, blank, "undecodable image"))
            continue
        height, width = size
        records.append((path.name, np.array([width // 2, height // 2], np.float64), max(height, width) / 200.0,
                        part, blank, None))
    return _rows(records)
