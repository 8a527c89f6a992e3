"""Sample images and keypoints: encoding, SPIN-style square crops, and the checks that send a bad
sample to quarantine instead of crashing a stage.

Pixel coordinates are continuous: pixel (i, j) covers [j, j+1) x [i, i+1), so a crop of `size`
pixels spans [0, size] and its normalized coordinates are 2 * px / size - 1 (SPIN's convention).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fitting.errors import BadInput
from fitting.keypoints import NUM_KEYPOINTS
from trainer.data.tables import ARRAY_SHAPES, QUARANTINE_SCHEMA, make_table

# SPIN's crop box is the person's box enlarged by this factor: context around the person.
CROP_MARGIN = 1.2
DEFAULT_MIN_VISIBLE = 6
_GT_COLUMNS = ("pose", "betas", "joints3d")


def encode_image(image: np.ndarray, ext: str = ".jpg", quality: int = 92) -> bytes:
    """(H, W, 3) uint8 RGB -> encoded bytes (JPEG by default, or PNG with ext='.png')."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadInput(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(image[..., ::-1]), params)
    if not ok:
        raise BadInput(f"could not encode image as {ext}")
    return buf.tobytes()


def _check_complete(data: bytes) -> None:
    # libjpeg decodes a truncated JPEG into a grey-filled image without an error: check the end marker
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise BadInput("truncated JPEG (no end-of-image marker)")


def decode_image(data: bytes | None) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB. BadInput when empty, truncated or undecodable."""
    if not data:
        raise BadInput("empty image data")
    _check_complete(bytes(data))
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise BadInput("undecodable image data")
    return np.ascontiguousarray(image[..., ::-1])


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) bool or uint8 label map -> PNG bytes (bool masks are stored as 0/255)."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(mask.astype(np.uint8)))
    if not ok:
        raise BadInput("could not encode mask")
    return buf.tobytes()


def decode_mask(data: bytes | None) -> np.ndarray:
    """PNG bytes -> (H, W) uint8 (labels as stored; a foreground mask is 0/255)."""
    if not data:
        raise BadInput("empty mask data")
    mask = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise BadInput("undecodable mask data")
    return mask if mask.ndim == 2 else mask[..., 0]


def read_image_file(path: str | Path, grayscale: bool = False) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB (or (H, W) with grayscale). BadInput when missing or
    undecodable."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"image not found: {path}")
    data = path.read_bytes()
    if grayscale:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise BadInput(f"undecodable image: {path}")
        return image
    try:
        return decode_image(data)
    except BadInput as exc:
        raise BadInput(f"{exc}: {path}") from None


def box_to_center_scale(box: np.ndarray, margin: float = CROP_MARGIN) -> tuple[np.ndarray, float]:
    """Person box (x0, y0, x1, y1) in pixels -> SPIN's (center (2,), scale): the square crop of
    side 200 * scale is the box's longer side times `margin`."""
    x0, y0, x1, y1 = (float(v) for v in box)
    center = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    return center, margin * max(x1 - x0, y1 - y0) / 200.0


def crop_transform(center: np.ndarray, scale: float, size: int) -> np.ndarray:
    """(2, 3) affine map from source pixels to crop pixels for SPIN's box of side 200 * scale
    around `center`, resampled to `size` pixels."""
    side = 200.0 * float(scale)
    if not np.isfinite(side) or side <= 0:
        raise BadInput(f"crop scale must be positive, got {scale}")
    s = size / side
    cx, cy = (float(v) for v in center)
    return np.array([[s, 0.0, size / 2.0 - s * cx], [0.0, s, size / 2.0 - s * cy]])


def transform_points(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine map to (N, 2+) points; extra columns (confidence) are kept."""
    points = np.asarray(points, dtype=np.float64)
    out = points.copy()
    out[:, :2] = points[:, :2] @ transform[:, :2].T + transform[:, 2]
    return out


def crop_square(
    image: np.ndarray,
    center: np.ndarray,
    scale: float,
    size: int,
    interpolation: int = cv2.INTER_LINEAR,
) -> tuple[np.ndarray, np.ndarray]:
    """SPIN's square crop: the box of side 200 * scale around `center`, resampled to size x size,
    zero outside the image. Returns (crop, transform (2, 3)); transform maps source pixels to crop
    pixels, for the keypoints (`transform_points`)."""
    transform = crop_transform(center, scale, size)
    # OpenCV puts pixel centres at integer coordinates, this module at half-integers
    shift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    unshift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    full = np.vstack([transform, [0.0, 0.0, 1.0]])
    cv_transform = (shift @ full @ unshift)[:2]
    crop = cv2.warpAffine(
        image, cv_transform, (size, size), flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )
    return crop, transform


def spin_box(center: np.ndarray, scale: float, res: int) -> tuple[np.ndarray, np.ndarray]:
    """SPIN's integer crop box (utils/imutils.py `crop` and `uncrop`): the corners of the `res`-pixel
    crop mapped back into the image through SPIN's `transform` (inverted affine, 1-based, truncated
    toward zero). Returns ul, br (2,) int: the box is [ul, br) in x and y."""
    h = 200.0 * float(scale)
    t = np.array([[res / h, 0.0, res * (-float(center[0]) / h + 0.5)],
                  [0.0, res / h, res * (-float(center[1]) / h + 0.5)],
                  [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(t)
    corners = [(inverse @ np.array([p - 1.0, p - 1.0, 1.0]))[:2].astype(int) + 1 - 1 for p in (1, res + 1)]
    return corners[0], corners[1]


def uncrop_labels(labels: np.ndarray, center: np.ndarray, scale: float, image_shape: tuple[int, int]) -> np.ndarray:
    """A square (res, res) uint8 label map of the crop -> (H, W) of the original image, as SPIN's
    `uncrop` puts a rendered LSP mask back: resized with nearest neighbours (PIL's, which
    `scipy.misc.imresize` used) to SPIN's integer box, pasted where the box overlaps the image,
    zero elsewhere."""
    res = labels.shape[0]
    ul, br = spin_box(center, scale, res)
    H, W = int(image_shape[0]), int(image_shape[1])
    out = np.zeros((H, W), np.uint8)
    if br[0] <= ul[0] or br[1] <= ul[1]:
        return out
    resized = cv2.resize(np.ascontiguousarray(labels, np.uint8), (int(br[0] - ul[0]), int(br[1] - ul[1])),
                         interpolation=cv2.INTER_NEAREST_EXACT)
    x0, x1 = max(0, ul[0]), min(W, br[0])
    y0, y1 = max(0, ul[1]), min(H, br[1])
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = resized[y0 - ul[1]:y1 - ul[1], x0 - ul[0]:x1 - ul[0]]
    return out


def to_normalized(points_px: np.ndarray, size: int) -> np.ndarray:
    """(N, 2+) crop pixels -> SPIN's [-1, 1] crop coordinates (extra columns kept)."""
    out = np.array(points_px, dtype=np.float64)
    out[:, :2] = out[:, :2] * (2.0 / size) - 1.0
    return out


def from_normalized(points: np.ndarray, size: int) -> np.ndarray:
    """(N, 2+) [-1, 1] crop coordinates -> crop pixels (extra columns kept)."""
    out = np.array(points, dtype=np.float64)
    out[..., :2] = (out[..., :2] + 1.0) * (size / 2.0)
    return out


# ------------------------------------------------------------------------------- validation

def _row_lengths(column: pa.Array) -> np.ndarray:
    """Number of values per row of a list column, -1 for null rows."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    return np.where(column.is_null().to_numpy(zero_copy_only=False), -1, np.nan_to_num(lengths, nan=-1)).astype(np.int64)


def _array_problems(table: pa.Table, name: str, required: bool) -> list[str | None]:
    """Per row: None when column `name` is fine (or null and optional), else the reason."""
    n = len(table)
    if name not in table.column_names:
        return [f"no {name}" if required else None] * n
    shape = ARRAY_SHAPES[name]
    size = int(np.prod(shape))
    column = table.column(name).combine_chunks()
    lengths = _row_lengths(column)
    reasons: list[str | None] = [None] * n
    ok_rows = np.flatnonzero(lengths == size)
    if len(ok_rows):
        values = pc.list_flatten(column.take(pa.array(ok_rows))).to_numpy(zero_copy_only=False)
        finite = np.isfinite(values.astype(np.float64).reshape(len(ok_rows), size)).all(axis=1)
        for row in ok_rows[~finite]:
            reasons[row] = f"{name} contain NaN or Inf"
    for row in np.flatnonzero(lengths != size):
        if lengths[row] < 0:
            reasons[row] = f"no {name}" if required else None
        else:
            reasons[row] = f"{name} have {lengths[row]} values, expected shape {shape}"
    return reasons


def _image_problem(data: bytes | None, uri: str | None) -> str | None:
    if data is None:
        return None if uri else "no image"
    try:
        decode_image(data)
    except BadInput as exc:
        return f"undecodable image ({exc})"
    return None


def _has_smpl(table: pa.Table) -> np.ndarray:
    """(N,) rows flagged has_smpl (their pose and betas are checked with the other truth)."""
    if "has_smpl" not in table.column_names:
        return np.zeros(len(table), bool)
    return np.array([bool(v) for v in table.column("has_smpl").to_pylist()], bool)


def validate_samples(
    table: pa.Table,
    min_visible: int = DEFAULT_MIN_VISIBLE,
    source: str = "",
    check_images: bool = True,
    labels_2d: np.ndarray | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Split a samples table into (good rows, quarantine table with one reason per bad row).

    A row is bad when its sample_id repeats an earlier row's, its image is missing or undecodable
    (decoding is skipped with check_images=False), its keypoints are not (49, 3) or not finite,
    a confidence is negative, its labels are its 2D keypoints and fewer than `min_visible` of them
    have confidence > 0, or a ground-truth array (pose, betas, joints3d) that is present has the
    wrong size or non-finite values. The first reason found is reported.

    A row's labels are its 2D keypoints unless it has ground-truth SMPL (`has_smpl`), or
    `labels_2d` (N,) bool says otherwise (an evaluation set scored on its 3D truth).
    """
    n = len(table)
    ids = table.column("sample_id").to_pylist()
    reasons: list[str | None] = [None] * n
    seen: set[str] = set()
    for row, sid in enumerate(ids):
        if sid is None or sid == "":
            reasons[row] = "empty sample_id"
        elif sid in seen:
            reasons[row] = f"duplicate sample_id '{sid}'"
        seen.add(sid)

    if check_images:
        images = table.column("image").to_pylist() if "image" in table.column_names else [None] * n
        uris = table.column("image_uri").to_pylist() if "image_uri" in table.column_names else [None] * n
        for row in range(n):
            if reasons[row] is None:
                reasons[row] = _image_problem(images[row], uris[row])

    kp_reasons = _array_problems(table, "keypoints", required=True)
    for row in range(n):
        reasons[row] = reasons[row] or kp_reasons[row]
    ok_rows = np.array([r is None for r in reasons])
    labelled_2d = np.ones(n, bool) if labels_2d is None else np.asarray(labels_2d, bool).copy()
    labelled_2d &= ~_has_smpl(table)
    if ok_rows.any():
        kps = pc.list_flatten(table.column("keypoints").combine_chunks().filter(pa.array(ok_rows)))
        conf = kps.to_numpy(zero_copy_only=False).reshape(-1, NUM_KEYPOINTS, 3)[:, :, 2]
        for row, c in zip(np.flatnonzero(ok_rows), conf):
            if (c < 0).any():
                reasons[row] = "negative keypoint confidence"
            elif labelled_2d[row] and int((c > 0).sum()) < min_visible:
                reasons[row] = f"only {int((c > 0).sum())} visible keypoints (< {min_visible})"

    for name in _GT_COLUMNS:
        for row, reason in enumerate(_array_problems(table, name, required=False)):
            reasons[row] = reasons[row] or reason

    bad = [row for row, r in enumerate(reasons) if r is not None]
    quarantine = make_table(
        {"sample_id": [ids[r] for r in bad], "source": [source] * len(bad), "reason": [reasons[r] for r in bad]},
        QUARANTINE_SCHEMA,
    )
    good = table.filter(pa.array([r is None for r in reasons])) if bad else table
    return good, quarantine
