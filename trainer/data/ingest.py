"""Import SPIN's preprocessed dataset files (`dataset_extras/*.npz`) into samples shards.

SPIN's files hold, per person: `imgname` (relative to the dataset's image folder), `center` and
`scale` of the crop box (box side = 200 * scale, the 1.2 margin already applied), `part` (24, 3)
ground-truth-convention keypoints in source pixels with visibility, `openpose` (25, 3)
detections, `S` (24, 4) 3D joints, `pose` (72), `shape` (10), `has_smpl`, `gender`, and for
evaluation sets `maskname` / `partname`. Every key but imgname, center and scale may be missing.
The file is read by fitting.npz: object arrays, and arrays larger than the file holds, are refused.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from fitting.errors import BadInput
from fitting.npz import read_npz
from trainer.data.samples import (
    DEFAULT_MIN_VISIBLE,
    crop_square,
    encode_image,
    encode_mask,
    read_image_file,
    to_normalized,
    transform_points,
    validate_samples,
)
from trainer.data.tables import QUARANTINE_SCHEMA, SAMPLES_SCHEMA, concat, make_table, write_table

# key -> shape of one row (None: the key is a string array)
SPIN_KEYS: dict[str, tuple[int, ...] | None] = {
    "imgname": None, "center": (2,), "scale": (), "part": (24, 3), "openpose": (25, 3),
    "S": (24, 4), "pose": (72,), "shape": (10,), "has_smpl": (), "gender": None,
    "maskname": None, "partname": None,
}
_REQUIRED = ("imgname", "center", "scale")


def read_spin_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The known keys of a SPIN dataset .npz, shape-checked; unknown keys are never decompressed.
    BadInput (one line) for a missing, unreadable or malformed file, or one that declares arrays
    larger than it holds."""
    path = Path(path)
    arrays = read_npz(path, SPIN_KEYS, what="SPIN dataset .npz")
    for key in _REQUIRED:
        if key not in arrays:
            raise BadInput(f"{path}: missing key '{key}'")
    n = len(arrays["imgname"])
    if "scale" in arrays and arrays["scale"].shape == (n, 1):
        arrays["scale"] = arrays["scale"][:, 0]
    for key, row_shape in SPIN_KEYS.items():
        if key not in arrays:
            continue
        value = arrays[key]
        if row_shape is None:
            if value.ndim != 1 or value.dtype.kind not in "US":
                raise BadInput(f"{path}: '{key}' must be a 1-d string array, got {value.dtype} {value.shape}")
            arrays[key] = value.astype(str)
        else:
            if value.shape != (n, *row_shape):
                want = "x".join(str(d) for d in (n, *row_shape))
                raise BadInput(f"{path}: '{key}' has shape {value.shape}, expected {want}")
            if value.dtype.kind not in "fiub":
                raise BadInput(f"{path}: '{key}' must be numeric, got {value.dtype}")
    return arrays


def spin_keypoints(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 49, 3) source-pixel keypoints, SPIN's order: openpose (25) then part (24); a block
    that the file lacks has confidence 0."""
    n = len(arrays["imgname"])
    openpose = arrays.get("openpose", np.zeros((n, 25, 3)))
    part = arrays.get("part", np.zeros((n, 24, 3)))
    keypoints = np.concatenate([openpose, part], axis=1).astype(np.float64)
    # SPIN's coordinates are 0-based pixel indices; this project puts pixel centres at +0.5
    keypoints[..., :2] += 0.5
    return keypoints


@dataclass(frozen=True)
class IngestRow:
    """What one npz row becomes: the sample's columns, or a reason to quarantine it."""
    index: int
    columns: dict | None = None
    reason: str | None = None


def _crop_label_image(path: Path, center: np.ndarray, scale: float, size: int, binary: bool) -> bytes:
    label = read_image_file(path, grayscale=True)
    crop, _ = crop_square(label, center, scale, size, interpolation=cv2.INTER_NEAREST)
    return encode_mask(crop > 0 if binary else crop)


def under(images_root: Path, name: str) -> Path:
    """The file `name` names inside `images_root`; a name that leaves it (an absolute path, `..`)
    is refused, so a dataset file never makes ingest read elsewhere."""
    path = Path(os.path.normpath(images_root / name))
    if Path(name).is_absolute() or not path.is_relative_to(os.path.normpath(images_root)):
        raise BadInput(f"image path outside --images: {name}")
    return path


def ingest_row(
    index: int, arrays: dict[str, np.ndarray], keypoints: np.ndarray, images_root: Path, img_size: int
) -> IngestRow:
    """Crop one person's image and transform its keypoints; a missing or undecodable image (or
    mask) is a quarantine reason, never an exception."""
    name = str(arrays["imgname"][index])
    center = np.asarray(arrays["center"][index], dtype=np.float64)
    scale = float(arrays["scale"][index])
    if not np.all(np.isfinite(center)) or not np.isfinite(scale) or scale <= 0:
        return IngestRow(index, reason=f"bad crop box (center {center.tolist()}, scale {scale})")
    try:
        image = read_image_file(under(images_root, name))
        crop, transform = crop_square(image, center, scale, img_size)
        columns = {"image": encode_image(crop), "center": center, "scale": scale}
        for key, column in (("maskname", "mask"), ("partname", "part_mask")):
            if key in arrays and str(arrays[key][index]):
                columns[column] = _crop_label_image(
                    under(images_root, str(arrays[key][index])), center, scale, img_size, binary=column == "mask"
                )
    except BadInput as exc:
        return IngestRow(index, reason=str(exc).replace(str(images_root) + "/", ""))
    kp = to_normalized(transform_points(keypoints[index], transform), img_size)
    kp[kp[:, 2] <= 0, :2] = 0.0  # absent keypoints carry no position
    columns["keypoints"] = kp
    return IngestRow(index, columns=columns)


def _chunk_table(rows: list[IngestRow], arrays: dict[str, np.ndarray], dataset: str) -> pa.Table:
    idx = np.array([r.index for r in rows], dtype=np.int64)
    n = len(arrays["imgname"])
    has_pose = "pose" in arrays and "shape" in arrays
    has_smpl = arrays["has_smpl"][idx] > 0 if "has_smpl" in arrays else np.full(len(idx), has_pose)
    gt = has_smpl & has_pose
    columns: dict[str, object] = {
        "sample_id": [f"{dataset}-{i:0{max(6, len(str(n)))}d}" for i in idx],
        "dataset": [dataset] * len(idx),
        "image": [r.columns["image"] for r in rows],
        "center": np.stack([r.columns["center"] for r in rows]),
        "scale": np.array([r.columns["scale"] for r in rows], dtype=np.float32),
        "keypoints": np.stack([r.columns["keypoints"] for r in rows]),
        "has_smpl": gt.tolist(),
        "mask": [r.columns.get("mask") for r in rows],
        "part_mask": [r.columns.get("part_mask") for r in rows],
    }
    if has_pose:
        columns["pose"] = [arrays["pose"][i] if g else None for i, g in zip(idx, gt)]
        columns["betas"] = [arrays["shape"][i] if g else None for i, g in zip(idx, gt)]
    if "S" in arrays:
        columns["joints3d"] = arrays["S"][idx]
    return make_table(columns, SAMPLES_SCHEMA)


def ingest_spin_npz(
    npz_path: str | Path,
    images_root: str | Path,
    out_dir: str | Path,
    dataset: str | None = None,
    img_size: int = 224,
    shard_size: int = 1000,
    min_visible: int = DEFAULT_MIN_VISIBLE,
    workers: int = 4,
    progress: bool = True,
) -> dict[str, object]:
    """SPIN .npz + its images -> OUT/part-XXXXX.parquet shards and OUT/quarantine.parquet.

    Rows are processed in chunks of `shard_size` (one shard per chunk, so memory stays bounded);
    each chunk goes through `validate_samples`. Returns the counts and quarantine reasons.
    """
    npz_path, images_root, out_dir = Path(npz_path), Path(images_root), Path(out_dir)
    if img_size < 16 or shard_size < 1:
        raise BadInput("--img-size must be >= 16 and --shard-size >= 1")
    arrays = read_spin_npz(npz_path)
    if not images_root.is_dir():
        raise BadInput(f"image folder not found: {images_root}")
    dataset = dataset or npz_path.stem
    keypoints = spin_keypoints(arrays)
    n = len(arrays["imgname"])
    quarantined, shards, written = [], 0, 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
        total=n, desc=f"ingest {dataset}", unit="img", disable=not progress
    ) as bar:
        for start in range(0, n, shard_size):
            indices = range(start, min(start + shard_size, n))
            rows = list(pool.map(lambda i: ingest_row(i, arrays, keypoints, images_root, img_size), indices))
            bar.update(len(rows))
            bad = [r for r in rows if r.reason is not None]
            sid = max(6, len(str(n)))
            quarantined.append(make_table({
                "sample_id": [f"{dataset}-{r.index:0{sid}d}" for r in bad],
                "source": [str(arrays["imgname"][r.index]) for r in bad],
                "reason": [r.reason for r in bad],
            }, QUARANTINE_SCHEMA))
            good_rows = [r for r in rows if r.reason is None]
            if not good_rows:
                continue
            good, rejected = validate_samples(
                _chunk_table(good_rows, arrays, dataset), min_visible=min_visible,
                source=npz_path.name, check_images=False,
            )
            quarantined.append(rejected)
            if len(good):
                write_table(good, out_dir / f"part-{shards:05d}.parquet")
                shards += 1
                written += len(good)
    quarantine = concat(quarantined, QUARANTINE_SCHEMA)
    write_table(quarantine, out_dir / "quarantine.parquet")
    reasons = Counter(r.split(":")[0].split(" (")[0] for r in quarantine.column("reason").to_pylist())
    return {
        "dataset": dataset, "rows": n, "written": written, "quarantined": len(quarantine),
        "shards": shards, "out": str(out_dir), "reasons": dict(reasons),
    }
