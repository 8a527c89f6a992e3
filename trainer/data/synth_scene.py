"""Appearance and labels of the synthetic benchmark: textured backgrounds, clothing-like vertex
colours, occluders, camera effects, and 2D keypoints as an annotator and a detector give them.

Every function draws only from the `rng` it is given, so a sample is a pure function of its seed.
Sizes are in pixels of the square crop (`size`); colours are uint8 RGB unless stated.
"""
from __future__ import annotations

import cv2
import numpy as np

from fitting.keypoints import FLIP_PERM, KEYPOINT_NAMES, LSP14, OP25

# Ground-truth-block joints that an annotator labels: LSP's 14 and the face points (as COCO does).
ANNOTATED: tuple[int, ...] = LSP14 + tuple(
    KEYPOINT_NAMES.index(n) for n in ("Nose", "Left Eye", "Right Eye", "Left Ear", "Right Ear")
)
# OpenPose limb pairs that a detector sometimes swaps left for right.
_SWAP_GROUPS = (
    ("OP RShoulder", "OP RElbow", "OP RWrist"), ("OP RHip", "OP RKnee", "OP RAnkle"),
)
SKIN_TONES = np.array([
    [255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 90], [161, 102, 64],
    [120, 75, 45], [90, 56, 38], [234, 190, 164],
], dtype=np.float64)
HAIR_TONES = np.array([[20, 16, 14], [60, 40, 25], [110, 75, 40], [180, 140, 80], [200, 190, 170], [40, 30, 30]],
                      dtype=np.float64)


def random_color(rng: np.random.Generator, saturation: tuple[float, float] = (0.1, 0.9),
                 value: tuple[float, float] = (0.15, 0.95)) -> np.ndarray:
    """A random RGB colour (3,) float in 0..255 from uniform hue and the given S, V ranges."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*saturation) * 255, rng.uniform(*value) * 255]]])
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float noise in 0..1 with about `cells` features across the image."""
    grid = rng.uniform(0, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _two_tone(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]


def texture(rng: np.random.Generator, size: int, kind: str | None = None) -> np.ndarray:
    """(size, size, 3) float RGB 0..255: noise, stripes, a gradient, blobs or checks."""
    kind = kind or rng.choice(["noise", "stripes", "gradient", "blobs", "checks"])
    a, b = random_color(rng), random_color(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "noise":
        t = _smooth_noise(rng, size, int(rng.integers(2, 12)))
        t = 0.7 * t + 0.3 * _smooth_noise(rng, size, int(rng.integers(16, 48)))
    elif kind == "stripes":
        theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 14)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 6.3))
        t = np.clip((t - 0.5) * rng.uniform(1, 6) + 0.5, 0, 1)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta) + 0.5
        t = np.clip(t, 0, 1)
    elif kind == "checks":
        cells = rng.uniform(3, 10)
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
        t = cv2.GaussianBlur(t, (0, 0), 0.5 + size / 200)
    else:
        image = np.empty((size, size, 3), np.float32)
        image[:] = a
        for _ in range(int(rng.integers(6, 20))):
            c = tuple(int(v) for v in rng.uniform(0, size, 2))
            axes = tuple(int(v) for v in rng.uniform(0.04, 0.3, 2) * size)
            cv2.ellipse(image, c, axes, rng.uniform(0, 180), 0, 360, random_color(rng).tolist(), -1)
        return cv2.GaussianBlur(image, (0, 0), size / 60).astype(np.float64)
    return _two_tone(a, b, t.astype(np.float64))


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: a textured scene, sometimes a wall over a floor, slightly out of
    focus so that the person stands out as in a photo."""
    image = texture(rng, size)
    if rng.uniform() < 0.5:  # a horizon: a second texture below it, like a floor
        horizon = rng.uniform(0.45, 0.9) * size
        below = np.arange(size)[:, None, None] >= horizon
        image = np.where(below, texture(rng, size), image)
    if rng.uniform() < 0.4:
        image = 0.6 * image + 0.4 * texture(rng, size)
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), rng.uniform(0.3, 1.5) * size / 128)
    return np.clip(image, 0, 255).astype(np.uint8)


def clothing_colors(
    rng: np.random.Generator, dominant_joint: np.ndarray, rest_vertices: np.ndarray, rest_joints: np.ndarray
) -> np.ndarray:
    """(V, 3) float RGB in 0..1: skin, hair, a top (short or long sleeves, maybe striped),
    trousers or shorts, shoes. dominant_joint (V,) is each vertex's strongest skinning joint;
    rest_vertices (V, 3) and rest_joints (24, 3) the template (y up, facing +z)."""
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.05)
    top, bottom, shoes = random_color(rng), random_color(rng, value=(0.1, 0.8)), random_color(rng, value=(0.05, 0.6))
    hair = HAIR_TONES[rng.integers(len(HAIR_TONES))]
    long_sleeves, long_legs = rng.uniform() < 0.6, rng.uniform() < 0.75
    regions = {
        "top": [3, 6, 9, 13, 14, 16, 17] + ([18, 19] if long_sleeves else []),
        "bottom": [0, 1, 2] + ([4, 5] if long_legs else []),
        "shoes": [7, 8, 10, 11] if long_legs or rng.uniform() < 0.8 else [10, 11],
    }
    colors = np.tile(skin, (len(dominant_joint), 1))
    for name, color in (("top", top), ("bottom", bottom), ("shoes", shoes)):
        colors[np.isin(dominant_joint, regions[name])] = color
    if rng.uniform() < 0.35:  # a striped or two-tone top
        is_top = np.isin(dominant_joint, regions["top"])
        stripes = np.sin(rest_vertices[:, 1] * rng.uniform(20, 60)) > rng.uniform(-0.3, 0.5)
        colors[is_top & stripes] = random_color(rng)
    head = rest_joints[15]
    is_head = np.isin(dominant_joint, [12, 15])
    hair_line = head[1] + rng.uniform(-0.02, 0.05)
    # hair covers the top and the back of the head, not the face
    is_hair = is_head & ((rest_vertices[:, 1] > hair_line + 0.04) | (
        (rest_vertices[:, 2] < head[2] - 0.02) & (rest_vertices[:, 1] > hair_line - rng.uniform(0.0, 0.12))))
    colors[is_hair] = hair
    colors *= rng.uniform(0.92, 1.08, size=(len(colors), 1))  # fabric and skin texture
    return np.clip(colors / 255.0, 0, 1)


def random_light(rng: np.random.Generator) -> np.ndarray:
    """(3,) unit direction of a key light, in the camera frame (pointing from the light to the scene:
    mostly from the front, above and to a side)."""
    d = np.array([rng.uniform(-0.7, 0.7), rng.uniform(0.1, 0.8), 1.0])
    return d / np.linalg.norm(d)


def draw_occluders(
    rng: np.random.Generator, image: np.ndarray, targets: np.ndarray, person_mask: np.ndarray,
    count: int, max_cover: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `count` rectangles or ellipses over target points (K, 2) (limb keypoints, crop px),
    skipping any occluder that would hide more than `max_cover` of the person's silhouette.
    Returns (image, occluder mask (H, W) bool); the input image is not modified."""
    size = image.shape[0]
    out = image.copy()
    occluded = np.zeros(image.shape[:2], bool)
    area = max(int(person_mask.sum()), 1)
    for _ in range(count):
        target = targets[rng.integers(len(targets))] + rng.normal(0, 0.04 * size, 2)
        axes = rng.uniform(0.06, 0.2, 2) * size
        angle = rng.uniform(0, 180)
        shape = np.zeros(image.shape[:2], np.uint8)
        centre = tuple(int(round(v)) for v in target)
        if rng.uniform() < 0.5:
            box = cv2.boxPoints((target.tolist(), (2 * axes).tolist(), angle)).astype(np.int32)
            cv2.fillPoly(shape, [box], 1)
        else:
            cv2.ellipse(shape, centre, tuple(int(v) for v in axes), angle, 0, 360, 1, -1)
        fill = texture(rng, size)
        candidate = occluded | shape.astype(bool)
        if (candidate & person_mask).sum() > max_cover * area:
            continue
        occluded = candidate
        out[shape.astype(bool)] = fill[shape.astype(bool)].astype(np.uint8)
    return out, occluded


def camera_effects(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Exposure, white balance, slight blur and sensor noise. (H, W, 3) uint8 -> uint8."""
    size = image.shape[0]
    out = image.astype(np.float32)
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.92, 1.08, size=3)
    out = out * gain.astype(np.float32) + rng.uniform(-15, 15)
    sigma = rng.uniform(0.0, 0.6) * size / 128
    if sigma > 0.2:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out += rng.normal(0, rng.uniform(0, 4), size=out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def annotate_keypoints(
    rng: np.random.Generator, clean_px: np.ndarray, visible: np.ndarray, size: int
) -> np.ndarray:
    """SPIN's 49 keypoints as a dataset has them, (49, 3) crop px + confidence.

    The ground-truth block holds annotations of LSP's 14 joints and the face points (confidence 1
    where visible, small annotator noise); the OpenPose block holds detections: confidence
    0.3..1, noise growing as confidence drops, missed joints, occasional outliers, a left/right
    swap now and then, and some occluded joints guessed at low confidence.
    clean_px (49, 2) projected keypoints; visible (49,) bool (in frame and not occluded).
    """
    in_frame = np.all((clean_px >= 0) & (clean_px < size), axis=1)
    out = np.zeros((len(clean_px), 3))
    gt = np.array(ANNOTATED)
    labelled = gt[visible[gt]]
    out[labelled, :2] = clean_px[labelled] + rng.normal(0, 0.006 * size, (len(labelled), 2))
    out[labelled, 2] = 1.0

    op = np.array(OP25)
    conf = np.clip(rng.beta(5, 1.5, len(op)), 0.3, 1.0)
    sigma = (0.006 + 0.03 * (1 - conf)) * size
    detected = visible[op] & (rng.uniform(size=len(op)) > 0.06)
    guessed = ~visible[op] & in_frame[op] & (rng.uniform(size=len(op)) < 0.25)
    conf = np.where(guessed, rng.uniform(0.3, 0.5, len(op)), conf)
    sigma = np.where(guessed, 0.05 * size, sigma)
    xy = clean_px[op] + rng.normal(0, 1, (len(op), 2)) * sigma[:, None]
    outlier = rng.uniform(size=len(op)) < 0.03
    angle = rng.uniform(0, 2 * np.pi, len(op))
    jump = rng.uniform(0.1, 0.3, len(op)) * size
    xy[outlier] += np.stack([np.cos(angle), np.sin(angle)], 1)[outlier] * jump[outlier, None]
    conf = np.where(outlier, np.minimum(conf, rng.uniform(0.3, 0.6, len(op))), conf)
    keep = (detected | guessed) & np.all((xy >= 0) & (xy < size), axis=1)
    out[op[keep], :2] = xy[keep]
    out[op[keep], 2] = conf[keep]
    if rng.uniform() < 0.04:
        group = _SWAP_GROUPS[rng.integers(len(_SWAP_GROUPS))]
        right = [KEYPOINT_NAMES.index(n) for n in group]
        left = [FLIP_PERM[i] for i in right]
        out[right + left] = out[left + right]
    return out
