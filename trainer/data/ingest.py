"""Import datasets into a data root (`trainer.data.datasets`): SPIN's preprocessed files
(`dataset_extras/*.npz`), and through `trainer.data.wild` OpenPose output folders and COCO
keypoint files, all by the same crop and checks.

SPIN's files hold, per person: `imgname` (relative to the dataset's image folder), `center` and
`scale` of the crop box (box side = 200 * scale, the 1.2 margin already applied), `part` (24, 3)
ground-truth-convention keypoints in source pixels with visibility, `openpose` (25, 3)
detections, `S` (24, 4) 3D joints, `pose` (72), `shape` (10), `has_smpl`, `gender`, and for
evaluation sets `maskname` / `partname`. Every key but imgname, center and scale may be missing.
The file is read by fitting.npz: object arrays, and arrays larger than the file holds, are refused.

Every source row ends up either a sample (in ROOT/<split>/<dataset>-part-XXXXX.parquet) or a
quarantined row with its reason (ROOT/_quarantine/<split>/<dataset>.parquet); shards are written
to a staging folder and moved into place only when the whole source is done, and the ingest record
is written last. A dataset already in the root is never written again.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
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
from trainer.data import datasets
from trainer.data.protocols import PROTOCOLS, protocol_for_dataset
from trainer.data.tables import QUARANTINE_SCHEMA, SAMPLES_SCHEMA, concat, make_table, shard_name, write_table
from trainer.data.wild import PersonRows

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


def spin_rows(path: str | Path) -> PersonRows:
    """A SPIN dataset file as rows to ingest (every row a candidate sample)."""
    arrays = read_spin_npz(path)
    return PersonRows(arrays, [None] * len(arrays["imgname"]))


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
    """What one source row becomes: the sample's columns, or a reason to quarantine it."""
    index: int
    columns: dict | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Roots:
    """Where a source's files are: images (imgname is relative to it) and mask / part PNGs
    (maskname, partname; UP-3D's folder for SPIN's LSP test set)."""
    images: Path
    masks: Path
    full_masks: bool = False    # keep masks as full-image PNGs (the protocol scores the whole image)


def _label_image(path: Path, center: np.ndarray, scale: float, size: int, binary: bool, full: bool) -> bytes:
    label = read_image_file(path, grayscale=True)
    if not full:
        label, _ = crop_square(label, center, scale, size, interpolation=cv2.INTER_NEAREST)
    return encode_mask(label > 0 if binary else label)


def under(root: Path, name: str, what: str = "image") -> Path:
    """The file `name` names inside `root` (--images or --masks); a name that leaves it (an
    absolute path, `..`) is refused, so a dataset file never makes ingest read elsewhere."""
    path = Path(os.path.normpath(root / name))
    if Path(name).is_absolute() or not path.is_relative_to(os.path.normpath(root)):
        raise BadInput(f"{what} path outside its folder: {name}")
    return path


def ingest_row(index: int, arrays: dict[str, np.ndarray], keypoints: np.ndarray, roots: Roots,
               img_size: int) -> IngestRow:
    """Crop one person's image and transform its keypoints; a missing or undecodable image (or
    mask) is a quarantine reason, never an exception."""
    name = str(arrays["imgname"][index])
    center = np.asarray(arrays["center"][index], dtype=np.float64)
    scale = float(arrays["scale"][index])
    if not np.all(np.isfinite(center)) or not np.isfinite(scale) or scale <= 0:
        return IngestRow(index, reason=f"bad crop box (center {center.tolist()}, scale {scale})")
    try:
        image = read_image_file(under(roots.images, name))
        crop, transform = crop_square(image, center, scale, img_size)
        columns = {"image": encode_image(crop), "center": center, "scale": scale}
        for key, column in (("maskname", "mask"), ("partname", "part_mask")):
            if key in arrays and str(arrays[key][index]):
                columns[column] = _label_image(under(roots.masks, str(arrays[key][index]), column), center, scale,
                                               img_size, binary=column == "mask", full=roots.full_masks)
    except BadInput as exc:
        return IngestRow(index, reason=str(exc).replace(str(roots.images) + "/", "").replace(str(roots.masks) + "/", ""))
    kp = to_normalized(transform_points(keypoints[index], transform), img_size)
    kp[kp[:, 2] <= 0, :2] = 0.0  # absent keypoints carry no position
    columns["keypoints"] = kp
    return IngestRow(index, columns=columns)


def sample_ids(dataset: str, indices, n: int) -> list[str]:
    """Stable ids: the dataset and the source row, zero-padded to the source's size."""
    width = max(6, len(str(n)))
    return [f"{dataset}-{int(i):0{width}d}" for i in indices]


def _chunk_table(rows: list[IngestRow], arrays: dict[str, np.ndarray], dataset: str, protocol: str) -> pa.Table:
    idx = np.array([r.index for r in rows], dtype=np.int64)
    n = len(arrays["imgname"])
    has_pose = "pose" in arrays and "shape" in arrays
    has_smpl = arrays["has_smpl"][idx] > 0 if "has_smpl" in arrays else np.full(len(idx), has_pose)
    gt = has_smpl & has_pose
    columns: dict[str, object] = {
        "sample_id": sample_ids(dataset, idx, n),
        "dataset": [dataset] * len(idx),
        "imgname": [str(arrays["imgname"][i]) for i in idx],
        "source_row": idx,
        "protocol": [protocol] * len(idx),
        "gender": [str(arrays["gender"][i]) for i in idx] if "gender" in arrays else None,
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


def labels_are_2d(table: pa.Table, split: str) -> np.ndarray:
    """(N,) rows whose labels are their 2D keypoints, so that the visibility rule applies: every
    training row (one with ground-truth SMPL is exempted by `validate_samples` itself), and the
    evaluation rows that carry no other truth (3D joints or masks)."""
    n = len(table)
    if split != "test":
        return np.ones(n, bool)
    joints = table.column("joints3d").to_pylist()
    has_3d = np.array([j is not None and any(c > 0 for c in j[3::4]) for j in joints], bool)
    has_mask = np.asarray(table.column("mask").is_valid().to_numpy(zero_copy_only=False), bool)
    return ~(has_3d | has_mask)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _commit(staging: Path, root: Path, split: str, names: list[str]) -> None:
    """Move finished shards from the staging folder into the split folder; never over a file."""
    target = root / split
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (target / name).exists():
            raise BadInput(f"{target / name} appeared during the ingest; nothing of it was overwritten")
        os.replace(staging / name, target / name)


class Converter:
    """Source rows -> samples tables by the one crop path (ingest, and predict on new images)."""

    def __init__(self, rows: PersonRows, roots: Roots, dataset: str, protocol: str, img_size: int):
        self.rows, self.roots, self.dataset, self.protocol, self.img_size = rows, roots, dataset, protocol, img_size
        self.keypoints = spin_keypoints(rows.arrays)
        self.n = len(rows.arrays["imgname"])

    def row(self, index: int) -> IngestRow:
        if self.rows.reasons[index] is not None:
            return IngestRow(index, reason=self.rows.reasons[index])
        return ingest_row(index, self.rows.arrays, self.keypoints, self.roots, self.img_size)

    def table(self, indices, pool: ThreadPoolExecutor, split: str, min_visible: int) -> tuple[pa.Table, pa.Table]:
        """(samples, quarantine) of some source rows; the quarantine's `source` is each row's image."""
        converted = list(pool.map(self.row, indices))
        names = self.rows.arrays["imgname"]
        bad = [r for r in converted if r.reason is not None]
        quarantine = make_table({"sample_id": sample_ids(self.dataset, [r.index for r in bad], self.n),
                                 "source": [str(names[r.index]) for r in bad],
                                 "reason": [r.reason for r in bad]}, QUARANTINE_SCHEMA)
        good_rows = [r for r in converted if r.reason is None]
        if not good_rows:
            return SAMPLES_SCHEMA.empty_table(), quarantine
        table = _chunk_table(good_rows, self.rows.arrays, self.dataset, self.protocol)
        good, rejected = validate_samples(table, min_visible=min_visible, check_images=False,
                                          labels_2d=labels_are_2d(table, split))
        image_of = dict(zip(table.column("sample_id").to_pylist(), table.column("imgname").to_pylist()))
        rejected = rejected.set_column(1, "source", pa.array(
            [image_of[sid] for sid in rejected.column("sample_id").to_pylist()], pa.string()))
        return good, concat([quarantine, rejected], QUARANTINE_SCHEMA)


def source_row(sample_id: str) -> int:
    """The source row of an id made by `sample_ids`."""
    return int(sample_id.rsplit("-", 1)[1])


def ingest_rows(
    rows: PersonRows,
    source: str | Path,
    fmt: str,
    roots: Roots,
    root: str | Path,
    dataset: str,
    split: str = "train",
    img_size: int = 224,
    shard_size: int = 1000,
    min_visible: int = DEFAULT_MIN_VISIBLE,
    workers: int = 4,
    progress: bool = True,
) -> dict[str, object]:
    """Source rows + their images -> ROOT/<split>/<dataset>-part-XXXXX.parquet, the quarantine
    (ROOT/_quarantine/<split>/<dataset>.parquet) and the ingest record, in that order.

    Rows are processed in chunks of `shard_size` (one shard per chunk, so memory stays bounded);
    each chunk goes through `validate_samples`. Returns the record: counts, quarantine reasons,
    protocol, source and its hash."""
    root = Path(root)
    if img_size < 16 or shard_size < 1:
        raise BadInput("--img-size must be >= 16 and --shard-size >= 1")
    for folder, what in ((roots.images, "image"), (roots.masks, "mask")):
        if not folder.is_dir():
            raise BadInput(f"{what} folder not found: {folder}")
    datasets.check_new_dataset(root, split, dataset)
    protocol = protocol_for_dataset(dataset)
    roots = Roots(roots.images, roots.masks, full_masks=PROTOCOLS[protocol].segmentation == "image")
    n = len(rows.arrays["imgname"])
    staging = datasets.staging_dir(root, split, dataset)
    shutil.rmtree(staging, ignore_errors=True)  # a killed ingest's leftovers: never visible to readers
    staging.mkdir(parents=True)
    quarantined, shards, written, started = [], [], 0, time.time()
    convert = Converter(rows, roots, dataset, protocol, img_size)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
        total=n, desc=f"ingest {dataset}", unit="img", disable=None if progress else True, leave=False
    ) as bar:  # a bar on a terminal only
        for start in range(0, n, shard_size):
            indices = range(start, min(start + shard_size, n))
            good, rejected = convert.table(indices, pool, split, min_visible)
            bar.update(len(indices))
            quarantined.append(rejected)
            if len(good):
                name = shard_name(len(shards), dataset)
                write_table(good, staging / name)
                shards.append(name)
                written += len(good)
    _commit(staging, root, split, shards)
    quarantine = concat(quarantined, QUARANTINE_SCHEMA)
    write_table(quarantine, datasets.quarantine_path(root, split, dataset))
    shutil.rmtree(staging, ignore_errors=True)
    for folder in (staging.parent, staging.parent.parent):  # only when empty: another ingest may be running
        with contextlib.suppress(OSError):
            folder.rmdir()
    reasons = Counter(r.split(":")[0].split(" (")[0] for r in quarantine.column("reason").to_pylist())
    source = Path(source)
    record = {
        "dataset": dataset, "split": split, "protocol": protocol, "format": fmt,
        "source": str(source.resolve()), "source_sha256": _file_digest(source) if source.is_file() else None,
        "images": str(roots.images.resolve()), "masks": str(roots.masks.resolve()),
        "rows": n, "written": written, "quarantined": len(quarantine), "shards": shards,
        "reasons": dict(reasons), "img_size": img_size, "min_visible": min_visible,
        "seconds": round(time.time() - started, 2), "out": str(root),
    }
    datasets.write_record(root, split, dataset, record)
    return record


def ingest_spin_npz(npz_path: str | Path, images_root: str | Path, root: str | Path, dataset: str | None = None,
                    split: str | None = None, masks_root: str | Path | None = None, **options) -> dict[str, object]:
    """A SPIN dataset file into a data root (see `ingest_rows`); the dataset name and split
    default to SPIN's for its file name."""
    dataset, split = datasets.dataset_and_split(npz_path, dataset, split)
    rows = spin_rows(npz_path)
    roots = Roots(Path(images_root), Path(masks_root or images_root))
    return ingest_rows(rows, npz_path, "spin-npz", roots, root, dataset, split, **options)
