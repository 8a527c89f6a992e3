"""The CPU renderer: silhouettes match projected geometry, the z-buffer keeps the nearest surface,
parts and keypoints land where the body is."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fitting.body_model import load_body_model
from fitting.keypoints import KEYPOINT_NAMES
from fitting.render import PART_NAMES, draw_keypoints, overlay_mesh, part_labels, render, render_labels


def inside_convex(polygon: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: pixel centres strictly inside the convex polygon (K, 2), either winding."""
    jj, ii = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    p = np.stack([jj, ii], -1)
    signs = []
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
        signs.append((b[0] - a[0]) * (p[..., 1] - a[1]) - (b[1] - a[1]) * (p[..., 0] - a[0]))
    signs = np.stack(signs)
    return (signs > 0).all(0) | (signs < 0).all(0)


def project(points: np.ndarray, focal: float, center) -> np.ndarray:
    return focal * points[:, :2] / points[:, 2:] + np.asarray(center)


def test_triangle_mask_is_its_projection():
    tri = np.array([[-0.31, -0.23, 2.0], [0.37, -0.11, 2.6], [0.03, 0.41, 3.1]])
    focal, center, size = 120.0, (32.2, 31.7), 64
    r = render(tri, np.array([[0, 1, 2]]), focal, center, size)
    expected = inside_convex(project(tri, focal, center), size)
    assert expected.sum() > 200
    assert (r.mask == expected).all()
    assert np.isinf(r.depth[~r.mask]).all() and (r.parts == 0).all()
    assert (r.image[~r.mask] == 0).all() and (r.image[r.mask].max(-1) > 0).all()


def cube(centre, half: float) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
    faces = np.array([
        [0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
        [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3],
    ])
    return np.asarray(centre) + half * corners, faces


def test_cube_silhouette_and_depth():
    verts, faces = cube([0.05, -0.03, 3.0], 0.5)
    focal, center, size = 100.0, (40.0, 40.0), 80
    r = render(verts, faces, focal, center, size)
    import cv2
    hull = cv2.convexHull(project(verts, focal, center).astype(np.float32))[:, 0]
    expected = inside_convex(hull.astype(np.float64), size)
    assert (r.mask == expected).all()
    # the front face (z = 2.5) is what is seen in the middle of the silhouette
    i, j = int(center[1] + focal * -0.03 / 2.5), int(center[0] + focal * 0.05 / 2.5)
    assert r.depth[i, j] == pytest.approx(2.5, abs=1e-5)


def test_slanted_plane_depth_is_perspective_correct():
    # plane z = 2 + 0.5 x, a large quad
    xs = np.array([-1.0, 1.0, 1.0, -1.0])
    ys = np.array([-1.0, -1.0, 1.0, 1.0])
    verts = np.stack([xs, ys, 2.0 + 0.5 * xs], 1)
    r = render(verts, np.array([[0, 1, 2], [0, 2, 3]]), 50.0, (32.0, 32.0), 64)
    i, j = 32 + 5, 32 + 15  # pixel centre (47.5, 37.5): ray direction ((u - c) / f, (v - c) / f, 1)
    dx = (j + 0.5 - 32) / 50.0
    z = 2.0 / (1.0 - 0.5 * dx)  # ray t*(dx, dy, 1) meets z = 2 + 0.5 x
    assert r.mask[i, j] and r.depth[i, j] == pytest.approx(z, rel=1e-5)


@pytest.mark.parametrize("front_first", [True, False])
def test_zbuffer_keeps_the_nearest_surface(front_first):
    near = np.array([[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [0.0, 1.0, 2.0]])
    far = near * [2.5, 2.5, 1.0] + [0.0, 0.0, 1.0]  # at z = 3, it sticks out around the near one
    verts = np.concatenate([near, far])
    faces = np.array([[0, 1, 2], [3, 4, 5]]) if front_first else np.array([[3, 4, 5], [0, 1, 2]])
    colors = np.array([[1.0, 0, 0]] * 3 + [[0, 0, 1.0]] * 3)
    labels = np.array([2] * 3 + [5] * 3)
    r = render(verts, faces, 30.0, (32.0, 32.0), 64, vertex_colors=colors, part_labels=labels,
               light_dir=np.array([0.0, 0.0, 1.0]))
    assert r.image[32, 32, 0] > 200 and r.image[32, 32, 2] == 0 and r.parts[32, 32] == 2
    assert r.depth[32, 32] == pytest.approx(2.0, abs=1e-6)
    assert (r.parts[r.mask] > 0).all() and (r.parts == 5).any()


def test_background_and_non_square_images():
    tri = np.array([[-0.2, -0.2, 2.0], [0.2, -0.2, 2.0], [0.0, 0.2, 2.0]])
    background = np.full((30, 50, 3), 77, dtype=np.uint8)
    r = render(tri, np.array([[0, 1, 2]]), 60.0, (25.0, 15.0), (30, 50), background=background)
    assert r.image.shape == (30, 50, 3) and (r.image[~r.mask] == 77).all() and r.mask.any()
    assert (background == 77).all()  # not written into
    # nothing behind the camera is drawn
    assert not render(tri * [1, 1, -1], np.array([[0, 1, 2]]), 60.0, (25.0, 15.0), (30, 50)).mask.any()


@pytest.fixture(scope="module")
def body():
    model = load_body_model()
    pose = torch.zeros(1, 72)
    pose[0, 0] = np.pi  # upright, facing the camera
    with torch.no_grad():
        out = model(pose, torch.zeros(1, 10))
    cam_t = np.array([0.0, 0.0, 2 * 5000 / (224 * 0.9)])  # SPIN's crop: the body spans 90% of it
    return model, out.vertices[0].numpy() + cam_t, out.keypoints[0].numpy() + cam_t


def test_body_vertices_fall_inside_the_mask(body):
    model, verts, _ = body
    labels = part_labels(model)
    for size in (224, 896):  # SPIN's crop, and 4x finer where fingers are several pixels wide
        focal, c = 5000.0 * size / 224, size / 2
        r = render(verts, model.faces, focal, (c, c), size, part_labels=labels)
        px = project(verts, focal, (c, c))
        cols, rows = np.floor(px[:, 0]).astype(int), np.floor(px[:, 1]).astype(int)
        import cv2
        grown = cv2.dilate(r.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert grown[rows, cols].all()  # every vertex projects onto (or next to) the silhouette
        # the rest are silhouette vertices whose pixel centre falls just outside (half of them)
        assert r.mask[rows, cols].mean() > (0.85 if size == 224 else 0.93)
    assert ((r.parts > 0) == r.mask).all()
    assert set(np.unique(r.parts[r.mask])) == set(range(1, len(PART_NAMES)))
    # facing the camera, the body's left arm is on the image's right
    left = np.nonzero(r.parts == PART_NAMES.index("left arm"))[1].mean()
    right = np.nonzero(r.parts == PART_NAMES.index("right arm"))[1].mean()
    assert left > c > right


def test_labels_alone_are_the_rendered_mask_and_parts(body):
    model, verts, _ = body
    labels = part_labels(model)
    full = render(verts, model.faces, 5000.0, (112, 112), (224, 200), part_labels=labels)
    mask, parts = render_labels(verts, model.faces, 5000.0, (112, 112), (224, 200), labels)
    assert mask.any() and np.array_equal(mask, full.mask) and np.array_equal(parts, full.parts)


def test_part_labels_follow_the_skinning(body):
    model = body[0]
    labels = part_labels(model)
    ids = model.vertex_joint_ids
    assert labels.shape == (model.num_vertices,) and labels.min() >= 1 and labels.max() <= 6
    assert labels[ids["nose"]] == PART_NAMES.index("head")
    assert labels[ids["lindex"]] == PART_NAMES.index("left arm") and labels[ids["rpinky"]] == PART_NAMES.index("right arm")
    assert labels[ids["LHeel"]] == PART_NAMES.index("left leg") and labels[ids["RBigToe"]] == PART_NAMES.index("right leg")


def test_draw_keypoints_returns_a_new_image(body):
    _, _, keypoints = body
    px = np.concatenate([project(keypoints, 5000.0, (112.0, 112.0)), np.ones((len(keypoints), 1))], 1)
    px[KEYPOINT_NAMES.index("OP Nose"), 2] = 0.0
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    drawn = draw_keypoints(image, px, radius=2)
    assert image.max() == 0 and drawn.shape == image.shape and drawn.dtype == np.uint8
    ankle = px[KEYPOINT_NAMES.index("Left Ankle")]
    assert drawn[int(ankle[1]), int(ankle[0])].max() > 0
    only_nose = np.zeros_like(px)
    only_nose[KEYPOINT_NAMES.index("OP Nose")] = [50.0, 50.0, 0.0]  # zero confidence: not drawn
    assert draw_keypoints(image, only_nose).max() == 0


def test_overlay_changes_only_the_covered_pixels(body):
    model, verts, _ = body
    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    mask = render(verts, model.faces, 5000.0, (112.0, 112.0), 224).mask
    out = overlay_mesh(image, verts, model.faces, 5000.0, (112.0, 112.0), alpha=0.6)
    assert (out[~mask] == image[~mask]).all() and (out[mask] != image[mask]).any()
    assert (overlay_mesh(image, verts, model.faces, 5000.0, (112.0, 112.0), alpha=0.0) == image).all()
