"""A small CPU renderer: a vectorized z-buffer rasterizer in numpy, Lambert shading, part masks,
and OpenCV drawing of keypoints. It is what the benchmark images, the fit overlays and
`body-model show` are made with, so it needs no GL context and runs anywhere.

Camera convention (SPIN's): camera-frame points in metres, the camera looks down +z, image x
right and y down; pixel (row i, column j) covers [j, j+1) x [i, i+1), so its centre is at
(j + 0.5, i + 0.5) and a principal point of size / 2 is the image centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fitting.camera import pinhole
from fitting.keypoints import KEYPOINT_NAMES, SKELETON

# The six parts of SPIN's LSP evaluation, in UP-3D's label order (`up_tools/model.py`,
# `six_region_groups`, label = group + 1), which SPIN compares pixel by pixel with UP-3D's PNGs:
# the label values of `Rendered.parts`. Right and left are the person's.
PART_NAMES: tuple[str, ...] = ("background", "head", "torso", "right arm", "left arm", "right leg", "left leg")
# SMPL joint -> part: the joint's skinning weights count towards that part. As in UP-3D, the neck
# (12) and the collars (13, 14) are torso; the shoulders (16, 17) begin the arms.
SMPL_JOINT_PART: tuple[int, ...] = (
    2, 6, 5, 2, 6, 5, 2, 6, 5, 2, 6, 5, 2, 2, 2, 1, 4, 3, 4, 3, 4, 3, 4, 3,
)
# RGB 0..1 colour of each part (index 0 unused).
PART_COLORS = np.array([
    [0.0, 0.0, 0.0], [0.85, 0.72, 0.62], [0.55, 0.62, 0.78], [0.85, 0.50, 0.40],
    [0.45, 0.75, 0.45], [0.85, 0.75, 0.35], [0.62, 0.48, 0.82],
], dtype=np.float64)
_AMBIENT = 0.35
_DIFFUSE = 0.65


@dataclass
class Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray   # (H, W) bool
    parts: np.ndarray  # (H, W) uint8, 0 = background, 1..6 = PART_NAMES[1:]
    depth: np.ndarray  # (H, W) float32, inf where empty


def _image_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) unit normals: area-weighted sums of the incident face normals."""
    tri = vertices[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_n)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def rasterize(
    vertices: np.ndarray, faces: np.ndarray, focal: float, center, size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visible triangle and barycentric coordinates of every pixel.

    Returns face (H, W) int64 (-1 where empty), bary (H, W, 3) float64 (perspective-correct), and
    depth (H, W) float32 (inf where empty). Triangles with a vertex at z <= 1e-6 are skipped.
    """
    H, W = _image_size(size)
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    cx, cy = float(center[0]), float(center[1])
    z = v[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        px = pinhole(v, focal, np.array([cx, cy]))
    tri = px[f]                                    # (F, 3, 2)
    tz = z[f]
    ok = (tz > 1e-6).all(1) & np.isfinite(tri).all((1, 2))
    lo = np.floor(tri.min(1) - 0.5).astype(np.int64) + 1   # first pixel centre >= min
    hi = np.floor(tri.max(1) - 0.5).astype(np.int64)       # last pixel centre <= max
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [W - 1, H - 1])
    ok &= (hi >= lo).all(1)
    ids = np.nonzero(ok)[0]
    face = np.full((H, W), -1, dtype=np.int64)
    bary_img = np.zeros((H, W, 3))
    depth = np.full((H, W), np.inf, dtype=np.float32)
    if ids.size == 0:
        return face, bary_img, depth
    nx = hi[ids, 0] - lo[ids, 0] + 1
    ny = hi[ids, 1] - lo[ids, 1] + 1
    counts = nx * ny
    # one row per (triangle, pixel in its bounding box), built without a python loop
    owner = np.repeat(np.arange(ids.size), counts)
    start = np.cumsum(counts) - counts
    local = np.arange(counts.sum()) - np.repeat(start, counts)
    pj = lo[ids, 0][owner] + local % nx[owner]
    pi = lo[ids, 1][owner] + local // nx[owner]
    t = ids[owner]
    p = np.stack([pj + 0.5, pi + 0.5], axis=1)
    pix, t, bary, zbuf = nearest_hits(tri, tz, t, p, pi * W + pj)
    face.reshape(-1)[pix] = t
    bary_img.reshape(-1, 3)[pix] = bary
    depth.reshape(-1)[pix] = zbuf
    return face, bary_img, depth


def nearest_hits(
    tri: np.ndarray, tz: np.ndarray, t: np.ndarray, p: np.ndarray, key: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The nearest surface hit per key among candidate (triangle, point) pairs.

    tri (F, 3, 2) projected triangles, tz (F, 3) their corners' depth; candidate pairs t (N,)
    triangle ids, p (N, 2) points, key (N,) int (the pixel or query point a pair belongs to).
    Returns, for each key with a point inside one of its triangles: key (M,), triangle (M,),
    perspective-correct barycentrics (M, 3) and depth (M,) of the nearest such hit."""
    a, b, c = tri[t, 0], tri[t, 1], tri[t, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    w0 = (b[:, 0] - p[:, 0]) * (c[:, 1] - p[:, 1]) - (b[:, 1] - p[:, 1]) * (c[:, 0] - p[:, 0])
    w1 = (c[:, 0] - p[:, 0]) * (a[:, 1] - p[:, 1]) - (c[:, 1] - p[:, 1]) * (a[:, 0] - p[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        l0, l1 = w0 / area, w1 / area
    l2 = 1.0 - l0 - l1
    eps = -1e-9
    inside = (np.abs(area) > 1e-12) & (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
    t, key = t[inside], key[inside]
    if t.size == 0:
        return key, t, np.zeros((0, 3)), np.zeros(0)
    screen = np.stack([l0[inside], l1[inside], l2[inside]], axis=1)
    # perspective-correct barycentrics: interpolate 1/z in screen space
    inv_z = screen / tz[t]
    zbuf = 1.0 / inv_z.sum(1)
    bary = inv_z * zbuf[:, None]
    order = np.lexsort((zbuf, key))                # nearest first within each key
    key_sorted = key[order]
    first = order[np.r_[True, key_sorted[1:] != key_sorted[:-1]]]
    return key[first], t[first], bary[first], zbuf[first]


def boxes_under(points: np.ndarray, lo: np.ndarray, hi: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (point, box) pairs with the point inside the box: points (K, 2), boxes lo/hi (B, 2),
    of which only `ids` count. Returns point indices (N,) and box indices (N,).

    The boxes are sorted by (band of their top edge, left edge), bands as tall as the largest box
    side: a point can only lie in a box of its own band or the band above whose left edge is at
    most that side to its left, two contiguous runs of the order (cheaper than testing every box)."""
    if ids.size == 0 or len(points) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    span = 1.0 + float((hi[ids] - lo[ids]).max())
    reach = 4.0 * (float(np.abs(lo[ids, 0]).max()) + float(np.abs(points[:, 0]).max()) + span)  # > any x gap
    key = np.floor(lo[ids, 1] / span) * reach + lo[ids, 0]
    order = np.argsort(key, kind="stable")
    key, boxes = key[order], ids[order]
    band = np.floor(points[:, 1] / span)
    query = np.concatenate([band, band - 1]) * reach + np.concatenate([points[:, 0], points[:, 0]])
    start = np.searchsorted(key, query - span, side="left")
    count = np.searchsorted(key, query, side="right") - start
    k = np.repeat(np.tile(np.arange(len(points)), 2), count)
    b = boxes[np.repeat(start, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)]
    p = points[k]
    inside = (p[:, 0] >= lo[b, 0]) & (p[:, 0] <= hi[b, 0]) & (p[:, 1] >= lo[b, 1]) & (p[:, 1] <= hi[b, 1])
    return k[inside], b[inside]


def surface_at_points(
    points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, focal: float, center
) -> tuple[np.ndarray, np.ndarray]:
    """The visible surface under each of (K, 2) pixel points, as `rasterize` finds it at a pixel
    centre, without rasterizing an image: depth (K,) (inf where there is none) and the corner
    vertex of the visible triangle nearest the hit (K,) (-1 where none).
    vertices (V, 3) in the camera frame, faces (F, 3)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tri = pinhole(v, focal, np.asarray(center, dtype=np.float64))[f]
    tz = v[:, 2][f]
    ok = (tz > 1e-6).all(1) & np.isfinite(tri).all((1, 2))
    pts = np.asarray(points, dtype=np.float64)
    k, t = boxes_under(pts, tri.min(1), tri.max(1), np.flatnonzero(ok))
    hit, t, bary, zbuf = nearest_hits(tri, tz, t, pts[k], k)
    depth = np.full(len(pts), np.inf)
    corner = np.full(len(pts), -1, dtype=np.int64)
    depth[hit] = zbuf
    corner[hit] = f[t, np.argmax(bary, axis=1)]
    return depth, corner


def render(
    vertices: np.ndarray,
    faces: np.ndarray,
    focal: float,
    center,
    size: int | tuple[int, int],
    vertex_colors: np.ndarray | None = None,
    part_labels: np.ndarray | None = None,
    background: np.ndarray | None = None,
    light_dir: np.ndarray | None = None,
) -> Rendered:
    """Render a mesh given in camera coordinates.

    vertices (V, 3) metres, camera frame; faces (F, 3); focal in pixels; center (2,) principal
    point in pixels; size: int (square) or (H, W). vertex_colors (V, 3) in 0..1, else the colour
    of each vertex's part (grey without parts). part_labels (V,) ints 1..6 fill `parts`.
    background (H, W, 3) uint8, else black. light_dir (3,): direction the light travels, in the
    camera frame (default: from over the camera's shoulder into the scene).
    """
    H, W = _image_size(size)
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    face, bary, depth = rasterize(v, f, focal, center, (H, W))
    mask = face >= 0
    fidx = face[mask]
    b = bary[mask]
    corner = f[fidx]                               # (P, 3) vertex ids of the visible triangles
    if vertex_colors is not None:
        colors = np.asarray(vertex_colors, dtype=np.float64)
    elif part_labels is not None:
        colors = PART_COLORS[np.asarray(part_labels, dtype=np.int64)]
    else:
        colors = np.full((len(v), 3), 0.75)
    normals = vertex_normals(v, f)
    n = np.einsum("pk,pkc->pc", b, normals[corner])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    light = np.array([0.3, 0.6, 1.0]) if light_dir is None else np.asarray(light_dir, dtype=np.float64)
    light = light / max(np.linalg.norm(light), 1e-12)
    # two-sided Lambert: meshes are closed, and an inward normal only flips the sign
    shade = _AMBIENT + _DIFFUSE * np.abs(n @ light)
    rgb = np.einsum("pk,pkc->pc", b, colors[corner]) * shade[:, None]
    if background is None:
        image = np.zeros((H, W, 3), dtype=np.uint8)
    else:
        image = np.array(background, dtype=np.uint8, copy=True)
        if image.shape != (H, W, 3):
            raise ValueError(f"background has shape {image.shape}, expected {(H, W, 3)}")
    image[mask] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    parts = np.zeros((H, W), dtype=np.uint8) if part_labels is None else _parts_image(mask, corner, b, part_labels)
    return Rendered(image=image, mask=mask, parts=parts, depth=depth)


def _parts_image(mask: np.ndarray, corner: np.ndarray, bary: np.ndarray, part_labels: np.ndarray) -> np.ndarray:
    """(H, W) uint8 part labels: each covered pixel takes the label of its triangle's nearest
    corner (`corner` (P, 3) vertex ids and `bary` (P, 3) of the P covered pixels, in mask order)."""
    parts = np.zeros(mask.shape, dtype=np.uint8)
    nearest = corner[np.arange(len(corner)), np.argmax(bary, axis=1)]
    parts[mask] = np.asarray(part_labels, dtype=np.int64)[nearest].astype(np.uint8)
    return parts


def render_labels(vertices: np.ndarray, faces: np.ndarray, focal: float, center, size: int | tuple[int, int],
                  part_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`render`'s mask and parts without its shaded image: ((H, W) bool, (H, W) uint8), what a
    segmentation score reads."""
    f = np.asarray(faces, dtype=np.int64)
    face, bary, _ = rasterize(np.asarray(vertices, dtype=np.float64), f, focal, center, _image_size(size))
    mask = face >= 0
    return mask, _parts_image(mask, f[face[mask]], bary[mask], part_labels)


def part_labels(model) -> np.ndarray:
    """(V,) int 1..6: the LSP part (PART_NAMES) that holds most of each vertex's skinning weight."""
    weights = np.asarray(model.smpl.lbs_weights.detach().cpu().numpy(), dtype=np.float64)
    onehot = np.zeros((len(SMPL_JOINT_PART), len(PART_NAMES)))
    onehot[np.arange(len(SMPL_JOINT_PART)), SMPL_JOINT_PART] = 1.0
    return np.argmax(weights @ onehot, axis=1).astype(np.int64)


def _side_color(name: str) -> tuple[int, int, int]:
    """RGB colour of a keypoint by body side: left blue, right red, centre green."""
    if name.startswith(("Left", "OP L")) or " Left" in name:
        return (40, 120, 255)
    if name.startswith(("Right", "OP R")) or " Right" in name:
        return (255, 70, 40)
    return (60, 220, 60)


def draw_keypoints(
    image: np.ndarray,
    keypoints_px: np.ndarray,
    skeleton=SKELETON,
    radius: int = 2,
    min_conf: float = 0.0,
) -> np.ndarray:
    """A copy of the RGB `image` with the bones of `skeleton` and the keypoints (K, 3: x, y,
    confidence; K = 49 for the side colours) drawn; points with confidence <= min_conf are skipped."""
    out = np.array(image, dtype=np.uint8, copy=True)
    kp = np.asarray(keypoints_px, dtype=np.float64)
    conf = kp[:, 2] if kp.shape[1] > 2 else np.ones(len(kp))
    visible = (conf > min_conf) & np.isfinite(kp[:, :2]).all(1)
    thickness = max(1, radius // 2)
    for a, b in skeleton:
        if a < len(kp) and b < len(kp) and visible[a] and visible[b]:
            name = KEYPOINT_NAMES[a] if len(kp) == len(KEYPOINT_NAMES) else ""
            cv2.line(out, _pt(kp[a]), _pt(kp[b]), _side_color(name), thickness, cv2.LINE_AA)
    for k in np.nonzero(visible)[0]:
        name = KEYPOINT_NAMES[k] if len(kp) == len(KEYPOINT_NAMES) else ""
        cv2.circle(out, _pt(kp[k]), radius, _side_color(name), -1, cv2.LINE_AA)
    return out


def _pt(xy: np.ndarray) -> tuple[int, int]:
    # OpenCV draws at integer pixel corners; keypoints use pixel-centre coordinates
    return int(np.floor(xy[0])), int(np.floor(xy[1]))


def overlay_mesh(
    image: np.ndarray,
    vertices: np.ndarray,
    faces: np.ndarray,
    focal: float,
    center,
    alpha: float = 0.6,
    part_labels: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of `image` (H, W, 3) uint8 with the shaded mesh blended in at `alpha` where it covers."""
    base = np.asarray(image, dtype=np.uint8)
    r = render(vertices, faces, focal, center, base.shape[:2], part_labels=part_labels)
    out = base.astype(np.float64).copy()
    out[r.mask] = (1.0 - alpha) * out[r.mask] + alpha * r.image[r.mask].astype(np.float64)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
