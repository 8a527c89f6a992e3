"""A random SMPL-layout body model for tests: a human-like skeleton with vertices scattered
along the bones. It only needs to be valid and posable, not pretty."""
from __future__ import annotations

import numpy as np

from fitting.keypoints import SMPL_PARENTS

REST_JOINTS = np.array([
    [0, 0, 0], [0.07, -0.09, 0], [-0.07, -0.09, 0], [0, 0.11, 0], [0.11, -0.47, 0],
    [-0.11, -0.47, 0], [0, 0.25, 0], [0.09, -0.87, -0.03], [-0.09, -0.87, -0.03], [0, 0.30, 0],
    [0.12, -0.93, 0.10], [-0.12, -0.93, 0.10], [0, 0.51, 0], [0.08, 0.42, 0], [-0.08, 0.42, 0],
    [0, 0.58, 0.03], [0.18, 0.45, 0], [-0.18, 0.45, 0], [0.43, 0.45, 0], [-0.43, 0.45, 0],
    [0.68, 0.45, 0], [-0.68, 0.45, 0], [0.76, 0.45, 0], [-0.76, 0.45, 0],
], dtype=np.float64)


def make_toy_smpl(num_vertices: int = 6890, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays in SMPL's .npz layout (float32) for a toy model of `num_vertices` vertices."""
    rng = np.random.default_rng(seed)
    bones = [(p, c) for c, p in enumerate(SMPL_PARENTS) if p >= 0]
    lengths = np.array([np.linalg.norm(REST_JOINTS[c] - REST_JOINTS[p]) + 0.05 for p, c in bones])
    counts = np.floor(lengths / lengths.sum() * num_vertices).astype(int)
    counts[0] += num_vertices - counts.sum()
    verts, owner = [], []
    for (p, c), n in zip(bones, counts):
        t = rng.uniform(0, 1, size=(n, 1))
        centre = REST_JOINTS[p] + t * (REST_JOINTS[c] - REST_JOINTS[p])
        verts.append(centre + rng.normal(scale=0.03, size=(n, 3)))
        owner.append(np.where(t[:, 0] < 0.5, p, c))
    v = np.concatenate(verts)
    owner = np.concatenate(owner)
    weights = np.full((num_vertices, 24), 0.0)
    weights[np.arange(num_vertices), owner] = 1.0
    J_regressor = np.zeros((24, num_vertices))
    for j in range(24):
        nearest = np.argsort(np.linalg.norm(v - REST_JOINTS[j], axis=1))[:12]
        J_regressor[j, nearest] = 1.0 / 12
    shapedirs = rng.normal(scale=0.005, size=(num_vertices, 3, 10))
    faces = np.arange(num_vertices - num_vertices % 3).reshape(-1, 3)
    kintree = np.array([[4294967295 if p < 0 else p for p in SMPL_PARENTS], list(range(24))], dtype=np.int64)
    return {
        "v_template": v.astype(np.float32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": np.zeros((num_vertices, 3, 207), dtype=np.float32),
        "J_regressor": J_regressor.astype(np.float32),
        "weights": weights.astype(np.float32),
        "kintree_table": kintree,
        "f": faces.astype(np.int64),
    }
