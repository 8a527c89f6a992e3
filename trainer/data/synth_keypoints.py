"""The synthetic benchmark's people as 2D keypoints only, without rendering their images.

A rendered sample's labels depend on its image only through visibility: a keypoint is labelled
when it is in frame, not behind another body part and not under an occluder. Here the surface in
front of each keypoint is ray-cast against the posed mesh (`fitting.render.surface_at_points`,
the visible triangle that the renderer's depth buffer holds there), its dominant joint is that of
the hit triangle's nearest corner (as the renderer labels pixels), and the occluders are the same
random shapes, as masks without texture. The scene, the crop and the annotation are the rendered
benchmark's own (`trainer.data.synth`), so both kinds of sample come from one distribution; a
sample costs about a third of a rendered one's CPU time (bench/keypoint_split.py).
"""
from __future__ import annotations

import cv2
import numpy as np

from fitting.camera import pinhole
from fitting.render import surface_at_points
from trainer.data.synth import (
    LIMB_KEYPOINTS,
    Scene,
    SynthConfig,
    SynthContext,
    in_frame,
    place_and_crop,
    posed_people,
    sample_labels,
    synth_context,
    visible_keypoints,
)
from trainer.data.synth_scene import place_occluders


def vertex_silhouette(px: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the pixels that hold a projected vertex (V, 2), closed by a 3x3 kernel.
    Only the occluders' cover rule reads it; at the benchmark's crop sizes the mesh is dense enough
    for it to match the rendered mask (IoU about 0.91) at a fraction of a triangle fill's cost."""
    mask = np.zeros((size, size), np.uint8)
    cells = np.floor(px[np.isfinite(px).all(1)]).astype(np.int64)
    cells = cells[((cells >= 0) & (cells < size)).all(1)]
    mask[cells[:, 1], cells[:, 0]] = 1
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)).astype(bool)


def cast_visibility(ctx: SynthContext, verts: np.ndarray, kp_cam: np.ndarray, kp_px: np.ndarray, focal: float,
                    pp: np.ndarray, size: int, occluder: np.ndarray | None = None) -> np.ndarray:
    """(49,) bool: `trainer.data.synth.keypoint_visibility`'s rule with the surface ray-cast.
    verts (V, 3) and kp_cam (49, 3) in the camera frame, kp_px (49, 2) crop pixels,
    occluder (size, size) bool or None."""
    depth, corner = surface_at_points(kp_px, verts, ctx.faces, focal, pp)
    joint = ctx.dominant[np.maximum(corner, 0)]   # where nothing is hit the depth is inf and the joint moot
    visible = visible_keypoints(kp_cam, in_frame(kp_px, size, size), depth, joint, ctx.own)
    if occluder is not None:
        rows = np.clip(np.nan_to_num(kp_px[:, 1]), 0, size - 1).astype(int)
        cols = np.clip(np.nan_to_num(kp_px[:, 0]), 0, size - 1).astype(int)
        visible &= ~occluder[rows, cols]
    return visible


def keypoint_sample(ctx: SynthContext, scene: Scene, vertices: np.ndarray, keypoints: np.ndarray,
                    rng: np.random.Generator, size: int, occluder_prob: float) -> dict:
    """`trainer.data.synth.render_sample`'s labels of one posed body (vertices (V, 3), keypoints
    (49, 3), no translation), without its image or masks."""
    cam_t, center, scale, focal, pp = place_and_crop(vertices, ctx.dominant, scene, size)
    verts, kp_cam = vertices + cam_t, keypoints + cam_t
    kp_px = pinhole(kp_cam, focal, pp)
    occluder = None
    if rng.uniform() < occluder_prob:
        person = vertex_silhouette(pinhole(verts, focal, pp), size)
        occluder, _ = place_occluders(rng, size, kp_px[list(LIMB_KEYPOINTS)], person, int(rng.integers(1, 3)),
                                      textured=False)
    visible = cast_visibility(ctx, verts, kp_cam, kp_px, focal, pp, size, occluder)
    return {**sample_labels(rng, kp_cam, kp_px, visible, size), "center": center, "scale": scale, "cam_t": cam_t}


def keypoint_chunk(cfg: SynthConfig, split: str, start: int, stop: int) -> list[dict]:
    """Samples start..stop-1 of a split as keypoints only: `render_chunk`'s records without
    image, mask and part mask."""
    ctx = synth_context(cfg.body_model)
    people = posed_people(ctx, cfg, split, start, stop)
    return [people.record(k, keypoint_sample(ctx, people.scenes[k], people.vertices[k], people.keypoints[k],
                                             people.rngs[k], cfg.img_size, cfg.occluder_prob), split, index)
            for k, index in enumerate(range(start, stop))]
