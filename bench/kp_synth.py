"""Prototype: the synthetic benchmark's train split as keypoints only, without rendering.

A rendered sample's labels depend on the image only through visibility: a keypoint is labelled
when it is in frame, not behind another body part (the depth buffer) and not under an occluder.
Here the depth is ray-cast at each keypoint against the projected mesh (exact, where the
renderer samples its 2x supersampled depth buffer at the keypoint's pixel), the surface's
dominant joint is that of the hit triangle's nearest corner (as the renderer labels pixels),
occluders are the same random shapes drawn as masks only (no texture), and the silhouette they
may cover is the mesh's triangles filled by OpenCV. The scene, the crop and the annotation are
`trainer.synth`'s own functions.

    python bench/kp_synth.py --out DIR --num 20000 [--seed 0] [--workers 2]   # writes DIR/train, DIR/truth
    python bench/kp_synth.py --compare 300                                     # visibility vs the renderer
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.keypoints import GT24, KEYPOINT_SOURCE  # noqa: E402
from trainer.samples import to_normalized  # noqa: E402
from trainer.synth import (  # noqa: E402
    FLESH_DEPTH, LIMB_JOINTS, SURFACE_TOL, SynthConfig, place_and_crop, project, sample_rng, sample_scene,
    scene_pose, synth_context,
)
from trainer.synth_scene import annotate_keypoints  # noqa: E402

SPLIT = "train"


def surface_at(points: np.ndarray, px: np.ndarray, z: np.ndarray, faces: np.ndarray):
    """Nearest surface under each of (K, 2) pixel points: depth (K,) (inf where none) and the
    index (K,) of the nearest corner vertex of the hit triangle (-1 where none).
    px (V, 2) projected vertices, z (V,) their depth, faces (F, 3).

    Candidates come from the triangles sorted by (band of their top edge, left edge), bands as
    tall as the tallest triangle: a point can only be inside those of its own band or the one
    above whose left edge lies within the widest triangle's width to its left."""
    a, b, c = px[faces[:, 0]], px[faces[:, 1]], px[faces[:, 2]]
    lo = np.minimum(np.minimum(a, b), c)
    hi = np.maximum(np.maximum(a, b), c)
    finite = np.flatnonzero(np.isfinite(lo).all(1) & np.isfinite(hi).all(1))
    span = 1.0 + float((hi[finite] - lo[finite]).max()) if len(finite) else 1.0
    band = np.floor(lo[finite, 1] / span)
    reach = 4.0 * (np.abs(lo[finite, 0]).max() + span) if len(finite) else 1.0   # > any x range
    key = band * reach + lo[finite, 0]
    order = finite[np.argsort(key, kind="stable")]
    key = np.sort(key, kind="stable")
    point_band = np.floor(points[:, 1] / span)
    queries = np.concatenate([point_band, point_band - 1])
    qx = np.concatenate([points[:, 0], points[:, 0]])
    start = np.searchsorted(key, queries * reach + qx - span, side="left")
    stop = np.searchsorted(key, queries * reach + qx, side="right")
    counts = np.maximum(stop - start, 0)
    k = np.repeat(np.tile(np.arange(len(points)), 2), counts)
    f = order[np.repeat(start, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))]
    p = points[k]
    keep = (p[:, 0] <= hi[f, 0]) & (p[:, 1] >= lo[f, 1]) & (p[:, 1] <= hi[f, 1])
    k, f, p = k[keep], f[keep], p[keep]
    depth = np.full(len(points), np.inf)
    corner = np.full(len(points), -1, np.int64)
    if len(k) == 0:
        return depth, corner
    a, b, c = a[f], b[f], c[f]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    w0 = (b[:, 0] - p[:, 0]) * (c[:, 1] - p[:, 1]) - (b[:, 1] - p[:, 1]) * (c[:, 0] - p[:, 0])
    w1 = (c[:, 0] - p[:, 0]) * (a[:, 1] - p[:, 1]) - (c[:, 1] - p[:, 1]) * (a[:, 0] - p[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        l0, l1 = w0 / area, w1 / area
    l2 = 1.0 - l0 - l1
    inside = (np.abs(area) > 1e-12) & (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
    k, f = k[inside], f[inside]
    screen = np.stack([l0[inside], l1[inside], l2[inside]], 1)
    inv = screen / z[faces[f]]
    zhit = 1.0 / inv.sum(1)
    bary = inv * zhit[:, None]
    order = np.lexsort((zhit, k))
    ks = k[order]
    first = order[np.r_[True, ks[1:] != ks[:-1]]]
    depth[k[first]] = zhit[first]
    corner[k[first]] = faces[f[first], np.argmax(bary[first], 1)]
    return depth, corner


def silhouette(px: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the pixels that hold a projected vertex, closed by a 3x3 kernel
    (the mesh is dense enough at the crop sizes here: IoU 0.91 with the rendered mask, as is the
    mesh's own triangle fill at 1/16 px, which costs 14x the time)."""
    mask = np.zeros((size, size), np.uint8)
    q = np.floor(px).astype(np.int64)
    ok = np.isfinite(px).all(1) & (q >= 0).all(1) & (q < size).all(1)
    mask[q[ok, 1], q[ok, 0]] = 1
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)).astype(bool)


def occluder_masks(rng: np.random.Generator, size: int, targets: np.ndarray, person: np.ndarray,
                   count: int, max_cover: float = 0.3) -> np.ndarray:
    """`trainer.synth_scene.draw_occluders`' shapes as a mask, without their texture."""
    occluded = np.zeros((size, size), bool)
    area = max(int(person.sum()), 1)
    for _ in range(count):
        target = targets[rng.integers(len(targets))] + rng.normal(0, 0.04 * size, 2)
        axes = rng.uniform(0.06, 0.2, 2) * size
        angle = rng.uniform(0, 180)
        shape = np.zeros((size, size), np.uint8)
        centre = tuple(int(round(v)) for v in target)
        if rng.uniform() < 0.5:
            box = cv2.boxPoints((target.tolist(), (2 * axes).tolist(), angle)).astype(np.int32)
            cv2.fillPoly(shape, [box], 1)
        else:
            cv2.ellipse(shape, centre, tuple(int(v) for v in axes), angle, 0, 360, 1, -1)
        candidate = occluded | shape.astype(bool)
        if (candidate & person).sum() > max_cover * area:
            continue
        occluded = candidate
    return occluded


def keypoint_visibility_cast(ctx, verts_cam: np.ndarray, kp_cam: np.ndarray, kp_px: np.ndarray, focal: float,
                             pp: np.ndarray, size: int, occluder: np.ndarray | None) -> np.ndarray:
    """(49,) bool, the rule of `trainer.synth.keypoint_visibility` with a ray-cast depth."""
    px = project(verts_cam, focal, pp)
    depth, corner = surface_at(kp_px, px, verts_cam[:, 2], ctx.faces)
    inside = np.all(np.isfinite(kp_px), 1) & (kp_px[:, 0] >= 0) & (kp_px[:, 0] < size) & (kp_px[:, 1] >= 0) & (kp_px[:, 1] < size)
    z = kp_cam[:, 2]
    in_front = ~np.isfinite(depth) | (z <= depth + SURFACE_TOL)
    joint = np.where(corner >= 0, ctx.dominant[np.maximum(corner, 0)], 0)
    own = ctx.own[np.arange(len(ctx.own)), joint] & (z - depth <= FLESH_DEPTH)
    visible = inside & (in_front | own)
    if occluder is not None:
        rows = np.clip(np.nan_to_num(kp_px[:, 1]), 0, size - 1).astype(int)
        cols = np.clip(np.nan_to_num(kp_px[:, 0]), 0, size - 1).astype(int)
        visible &= ~occluder[rows, cols]
    return visible


def keypoint_sample(ctx, scene, vertices: np.ndarray, keypoints: np.ndarray, rng: np.random.Generator,
                    size: int, occluder_prob: float) -> dict:
    """`trainer.synth.render_sample`'s labels without the image."""
    cam_t, center, scale, focal, pp = place_and_crop(vertices, ctx.dominant, scene, size)
    verts, kp_cam = vertices + cam_t, keypoints + cam_t
    kp_px = project(kp_cam, focal, pp)
    occluder = None
    if rng.uniform() < occluder_prob:
        person = silhouette(project(verts, focal, pp), size)
        targets = kp_px[[i for i, s in enumerate(KEYPOINT_SOURCE) if s in LIMB_JOINTS]]
        occluder = occluder_masks(rng, size, targets, person, int(rng.integers(1, 3)))
    visible = keypoint_visibility_cast(ctx, verts, kp_cam, kp_px, focal, pp, size, occluder)
    keypoints2d = annotate_keypoints(rng, kp_px, visible, size)
    in_frame = np.all((kp_px >= 0) & (kp_px < size), axis=1)
    return {
        "keypoints": to_normalized(keypoints2d, size),
        "clean": to_normalized(np.concatenate([kp_px, in_frame[:, None]], 1), size),
        "center": center, "scale": scale, "cam_t": cam_t, "visible": visible,
        "joints3d": np.concatenate([kp_cam[list(GT24)], np.ones((24, 1))], 1),
    }


def keypoint_chunk(cfg: SynthConfig, split: str, start: int, stop: int) -> list[dict]:
    ctx = synth_context(cfg.body_model)
    rngs = [sample_rng(cfg.seed, split, i) for i in range(start, stop)]
    scenes = [sample_scene(rng, cfg) for rng in rngs]
    pose = torch.as_tensor(np.stack([scene_pose(s) for s in scenes]), dtype=torch.float32)
    betas = torch.as_tensor(np.stack([s.betas for s in scenes]), dtype=torch.float32)
    with torch.no_grad():
        out = ctx.model(pose, betas)
    records = []
    for k, index in enumerate(range(start, stop)):
        record = keypoint_sample(ctx, scenes[k], out.vertices[k].double().numpy(), out.keypoints[k].double().numpy(),
                                 rngs[k], cfg.img_size, cfg.occluder_prob)
        record.update(sample_id=f"synth-{split}-{index:06d}", pose=pose[k].numpy(), betas=betas[k].numpy())
        records.append(record)
    return records


def _init() -> None:
    torch.set_num_threads(1)


def write_split(cfg: SynthConfig, out: Path, num: int, first: int, workers: int, split: str = SPLIT) -> dict:
    """Keypoint-only samples first..first+num-1 of `split` into out/train (no image) and out/truth."""
    from trainer.synth_run import ShardWriter

    chunk = 64
    jobs = [(s, min(s + chunk, first + num)) for s in range(first, first + num, chunk)]
    writers = {"train": ShardWriter(out / "train", cfg.shard_size), "truth": ShardWriter(out / "truth", cfg.shard_size)}
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init) as pool:
        for records in pool.map(keypoint_chunk, *zip(*[(cfg, split, a, b) for a, b in jobs])):
            for r in records:
                writers["train"].add({"sample_id": r["sample_id"], "dataset": "synth-kp", "image": None,
                                      "center": r["center"], "scale": float(r["scale"]), "keypoints": r["keypoints"],
                                      "has_smpl": False})
                writers["truth"].add({"sample_id": r["sample_id"], "dataset": "synth-kp", "keypoints": r["clean"],
                                      "has_smpl": True, "pose": r["pose"], "betas": r["betas"], "joints3d": r["joints3d"]})
    for w in writers.values():
        w.flush()
    return {"num": num, "seconds": round(time.perf_counter() - started, 1), "workers": workers}


def compare(num: int, seed: int = 0) -> dict:
    """Same scenes, no occluders: renderer visibility vs ray-cast visibility, and label statistics."""
    from trainer.synth import keypoint_visibility, render_body

    cfg = SynthConfig.from_preset("small", seed=seed)
    ctx = synth_context(None)
    agree, n_render, n_cast, t_render, t_cast = 0, 0, 0, 0.0, 0.0
    per_kp = np.zeros((2, 49))
    for i in range(num):
        rng = sample_rng(seed, "train", i)
        scene = sample_scene(rng, cfg)
        with torch.no_grad():
            out = ctx.model(torch.as_tensor(scene_pose(scene)[None], dtype=torch.float32),
                            torch.as_tensor(scene.betas[None], dtype=torch.float32))
        vertices, keypoints = out.vertices[0].double().numpy(), out.keypoints[0].double().numpy()
        cam_t, center, scale, focal, pp = place_and_crop(vertices, ctx.dominant, scene, cfg.img_size)
        verts, kp_cam = vertices + cam_t, keypoints + cam_t
        kp_px = project(kp_cam, focal, pp)
        t = time.perf_counter()
        body = render_body(ctx, verts, focal, pp, cfg.img_size, zoom=cfg.supersample)
        vis_r = keypoint_visibility(kp_cam, kp_px * body.zoom, body.depth, body.joints, ctx.own, None)
        t_render += time.perf_counter() - t
        t = time.perf_counter()
        vis_c = keypoint_visibility_cast(ctx, verts, kp_cam, kp_px, focal, pp, cfg.img_size, None)
        t_cast += time.perf_counter() - t
        agree += int((vis_r == vis_c).sum())
        n_render += int(vis_r.sum())
        n_cast += int(vis_c.sum())
        per_kp[0] += vis_r
        per_kp[1] += vis_c
    return {"samples": num, "keypoint_agreement": round(agree / (49 * num), 4),
            "visible_per_sample_render": round(n_render / num, 2), "visible_per_sample_cast": round(n_cast / num, 2),
            "max_per_keypoint_rate_diff": round(float(np.abs(per_kp[0] - per_kp[1]).max() / num), 4),
            "ms_render_visibility": round(1000 * t_render / num, 1), "ms_cast_visibility": round(1000 * t_cast / num, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--num", type=int, default=20000)
    parser.add_argument("--first", type=int, default=0, help="first sample index (the rendered split's count, to extend it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare", type=int, default=0)
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare(args.compare, args.seed), indent=2))
        return
    cfg = SynthConfig.from_preset("small", seed=args.seed, shard_size=2000)
    print(json.dumps(write_split(cfg, args.out, args.num, args.first, args.workers)))


if __name__ == "__main__":
    main()
