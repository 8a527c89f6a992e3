"""Mesh operations for deriving a body model from a high-resolution source: decimation that keeps a
subset of the original vertices, connected components, PCA shape directions, and sparse
non-negative vertex regressors fitted across shapes. numpy/scipy; fast-simplification for the
edge collapses (imported only by `decimate`)."""
from __future__ import annotations

import numpy as np


def magnify(points: np.ndarray, centers: np.ndarray, gain: float, radius: float) -> np.ndarray:
    """Radially magnify the neighbourhood of every centre: p + gain * exp(-d^2/r^2) (p - c).
    For gain < 2.2 each step is a homeomorphism, so the surface does not fold."""
    out = np.array(points, dtype=np.float64, copy=True)
    for c in centers:
        d = out - c
        out = out + gain * np.exp(-(d ** 2).sum(1, keepdims=True) / radius ** 2) * d
    return out


def decimate(vertices: np.ndarray, faces: np.ndarray, max_vertices: int,
             warped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation that keeps a subset of the original vertices.

    vertices (V, 3), faces (F, 3); `warped` (V, 3) are the positions the collapse costs are
    measured on (default: vertices). Returns kept (N,) original vertex ids, N <= max_vertices,
    and faces (F', 3) int64 indexing `kept`.
    """
    import fast_simplification

    pts = np.ascontiguousarray(vertices if warped is None else warped, dtype=np.float64)
    tris = np.ascontiguousarray(faces, dtype=np.int64)
    target = int(len(tris) * max_vertices / len(pts))
    for _ in range(20):
        _, _, collapses = fast_simplification.simplify(pts, tris, target_count=target, agg=3.0, return_collapses=True)
        _, new_faces, mapping = fast_simplification.replay_simplification(pts, tris, collapses)
        if mapping.max() + 1 <= max_vertices:
            break
        target = int(target * 0.99)
    collapsed = np.zeros(len(pts), dtype=bool)
    collapsed[collapses[:, 1]] = True
    survivors = np.nonzero(~collapsed)[0]
    kept = np.empty(mapping.max() + 1, dtype=np.int64)
    kept[mapping[survivors]] = survivors
    new_faces = np.asarray(new_faces, dtype=np.int64).reshape(-1, 3)
    good = (new_faces[:, 0] != new_faces[:, 1]) & (new_faces[:, 1] != new_faces[:, 2]) & (new_faces[:, 0] != new_faces[:, 2])
    return kept, new_faces[good]


def largest_component(num_vertices: int, faces: np.ndarray) -> np.ndarray:
    """(V,) bool mask of the largest connected component (drops eyeballs and the tongue)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    graph = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(num_vertices,) * 2)
    _, label = connected_components(graph, directed=False)
    return label == np.argmax(np.bincount(label))


def pca_shapedirs(meshes: np.ndarray, num: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, V, 3) meshes -> mean (V, 3), shapedirs (V, 3, num) = sqrt(eigenvalue) * eigenvector,
    and the explained variance ratio (num,). Signs: each component's largest entry is positive."""
    S, V, _ = meshes.shape
    mean = meshes.mean(0)
    centred = (meshes - mean).reshape(S, -1)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s ** 2 / (S - 1)
    comps = vt[:num] * np.sign(vt[:num][np.arange(num), np.argmax(np.abs(vt[:num]), axis=1)])[:, None]
    dirs = (comps * np.sqrt(var[:num])[:, None]).reshape(num, V, 3).transpose(1, 2, 0)
    return mean, dirs, var[:num] / var.sum()


def fit_sparse_regressor(meshes: np.ndarray, targets: np.ndarray, candidates: np.ndarray,
                         max_vertices: int, ridge: float = 1e-4) -> np.ndarray:
    """Non-negative weights summing to 1 over `candidates` such that weights @ mesh ~ target for
    every shape: meshes (S, V, 3), targets (S, 3). Least squares with a sum-to-one penalty and a
    small ridge (spreads weight over a ring rather than a couple of vertices), then pruned to the
    `max_vertices` largest weights and refitted. Returns (V,) weights."""
    from scipy.optimize import nnls

    def solve(ids: np.ndarray) -> np.ndarray:
        A = meshes[:, ids, :].transpose(0, 2, 1).reshape(-1, len(ids))
        b = targets.reshape(-1)
        scale = np.sqrt(len(b))
        A = np.vstack([A, scale * np.ones((1, len(ids))), np.sqrt(ridge * len(b)) * np.eye(len(ids))])
        b = np.concatenate([b, [scale], np.zeros(len(ids))])
        w, _ = nnls(A, b, maxiter=50 * len(ids))
        return w

    w = solve(candidates)
    keep = candidates[np.argsort(-w)[:max_vertices]]
    keep = keep[solve(keep) > 0] if (solve(keep) > 0).any() else keep
    out = np.zeros(meshes.shape[1])
    out[keep] = solve(keep)
    return out / out.sum()


def slab(points: np.ndarray, center: np.ndarray, normal: np.ndarray, half_width: float,
         radius: float, allowed: np.ndarray | None = None) -> np.ndarray:
    """Ids of the points within `half_width` of the plane through `center` with `normal`,
    within `radius` of `center`, and `allowed` (V,) bool."""
    normal = normal / np.linalg.norm(normal)
    d = points - center
    ok = (np.abs(d @ normal) < half_width) & (np.linalg.norm(d, axis=1) < radius)
    if allowed is not None:
        ok &= allowed
    return np.nonzero(ok)[0]
